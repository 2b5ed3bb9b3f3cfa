"""The FID callback's extra samplers and extractors, and the quality gate on a real (undertrained) run.

An undertrained model is a checkpoint of the bad kind: the gate must fail the command, after the final
checkpoint and the logs are written, while a run of another recipe only logs that the gate was not checked.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from diffusion_lab.metrics.gate import QualityGateError

STEPS = 4


def _cfg(compose_cfg, *extra):
    return compose_cfg([
        "callbacks=eval", f"trainer.max_steps={STEPS}", "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.on_train_end=false", f"callbacks.fid.every_n_steps={STEPS // 2}",
        "callbacks.fid.num_samples=64", "callbacks.fid.batch_size=64", "callbacks.fid.sampler.num_steps=5",
        "callbacks.model_checkpoint.every_n_train_steps=1000",
        *extra,
    ])


def test_undertrained_run_logs_every_fid_and_fails_the_gate_keeping_its_checkpoint(compose_cfg, caplog):
    from diffusion_lab.cli.train import train

    cfg = _cfg(compose_cfg, f"callbacks.fid.gate_recipe={{num_samples: 64, max_steps: {STEPS}}}")
    run = Path(cfg.paths.output_dir)
    with pytest.raises(QualityGateError, match=r"quality gate failed \(val/fid = .* is above its band"):
        train(cfg)
    assert (run / "checkpoints" / "last.ckpt").is_file()  # the run is kept
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("QualityGateError: quality gate failed")
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"val/fid", "val/is", "val/fid_ddim50", "val/fid_digits-pixels", "val/fid_ddim50_digits-pixels"} <= logged
    last = [row for row in rows if row.get("val/fid_ddim50")][-1]
    assert float(last["val/fid_ddim50"]) > 50 and float(last["val/fid_ddim50_digits-pixels"]) > 50  # noise, not digits


def test_a_run_of_another_recipe_is_not_gated(compose_cfg, caplog):
    from diffusion_lab.cli.train import train

    with caplog.at_level(logging.INFO, logger="diffusion_lab.callbacks.evaluation"):
        metrics = train(_cfg(compose_cfg))  # the default recipe: 1,000 samples, 2,000 steps
    assert metrics["val/fid_ddim50"] > 0
    assert "quality gate not checked: its bands hold for num_samples=1000, max_steps=2000; this run has " \
           f"num_samples=64, max_steps={STEPS}" in caplog.text


def test_bad_gate_extra_or_nested_sampler_settings_fail_at_start_up_in_one_line(tmp_path):
    """Before any training, as one ``error:`` line (exit 2), not a Hydra traceback."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "diffusion_lab.cli.train", f"hydra.run.dir={tmp_path}/run",
            f"paths.root_dir={tmp_path}", "trainer.max_steps=1"]
    for override, message in [
        # the gate still bounds the DDIM-50 scores that this run no longer computes
        ("callbacks.fid.extra_samplers=null",
         "callbacks.fid.gate bounds ['val/fid_ddim50', 'val/fid_ddim50_digits-pixels'], but this callback logs only"),
        # a nested sampler's bad setting, found before training (not at the first evaluation)
        ("+callbacks.fid.extra_samplers.ddim50.spacing=logsrn",
         "callbacks.fid.extra_samplers.ddim50.spacing='logsrn' is not allowed; allowed values: uniform, leading,"),
        ("+callbacks.fid.sampler.spacing=logsrn", "callbacks.fid.sampler.spacing='logsrn' is not allowed; allowed values: uniform, leading,"),
        ("callbacks.fid.extra_extractors=[digits-mlp]", "unknown feature extractor(s) ['digits-mlp']"),
    ]:
        result = subprocess.run([*base, override], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not list(tmp_path.glob("run/checkpoints/*.ckpt"))
