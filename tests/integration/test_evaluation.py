"""The Inception path with local random weights, the missing-weights error, the reference cache, the training
callback (1 vs 2 processes), and the evaluation command's report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from diffusion_lab.metrics import ReferenceMismatchError, WeightsError, extract
from diffusion_lab.metrics.extractors import INCEPTION_WEIGHTS_NAME, inception_weights_path, make_extractor
from diffusion_lab.metrics.reference import get_reference, reference_key, reference_path
from tests.conftest import eval_command


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised state dict in the format torch-fidelity's Inception loads (numbers meaningless)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        torch.manual_seed(0)
        model = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_NAME
    torch.save(model.state_dict(), path)
    return path


def test_inception_path_end_to_end_with_local_weights(random_inception_weights):
    extractor = make_extractor("inception-v3-compat", inception_weights=str(random_inception_weights))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    grey = images[:, :1]
    features, logits = extract(extractor, [images[:3], images[3:]])
    assert features.shape == (6, 2048) and logits.shape == (6, 1008) and features.dtype == torch.float64
    assert extract(extractor, [grey])[0].shape == (6, 2048)  # 1-channel images are repeated to RGB
    again, _ = extract(extractor, [images])
    torch.testing.assert_close(again, features)  # batching does not change features


def test_missing_inception_weights_say_what_to_place_where(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=f"{INCEPTION_WEIGHTS_NAME}.*95.5 MB.*inception_weights=/path/to/it for "
                       "diffusion-lab-eval, callbacks.fid.inception_weights=/path/to/it for diffusion-lab-train"):
        inception_weights_path(str(tmp_path / "nope.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match=str(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME)):
        inception_weights_path(None, allow_download=False)


def test_reference_cache_built_once_reused_and_mismatch_detected(tmp_path):
    from diffusion_lab.data import DiffusionDataModule, DigitsSource
    from diffusion_lab.metrics import reference as ref_module

    dm = DiffusionDataModule(DigitsSource(), name="digits", image_size=8, channels=1, batch_size=64, limit=300)
    calls = {"n": 0}
    real_build = ref_module.build_reference

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_build(*args, **kwargs)

    with mock.patch.object(ref_module, "build_reference", counting):
        first = get_reference(dm, "digits", "train", "digits-classifier", tmp_path)
        second = get_reference(dm, "digits", "train", "digits-classifier", tmp_path)
    assert calls["n"] == 1 and first["num_images"] == second["num_images"] == 300
    path = Path(first["path"])
    assert path.name == "digits-train-8px-digits-classifier.pt"
    assert torch.load(path, weights_only=True)["key"] == reference_key("digits", "train", 8, "digits-classifier")
    torch.testing.assert_close(torch.as_tensor(first["mu"]), torch.as_tensor(second["mu"]))

    # a file whose inside says another resolution is refused, not silently used
    stale = torch.load(path, weights_only=True)
    stale["key"] = reference_key("digits", "train", 16, "digits-classifier")
    torch.save(stale, path)
    with pytest.raises(ReferenceMismatchError, match="resolution.*16.*build_reference=true"):
        get_reference(dm, "digits", "train", "digits-classifier", tmp_path)
    assert reference_path(tmp_path, reference_key("digits", "train", 16, "x")).name == "digits-train-16px-x.pt"


def fid_cfg(compose_cfg, steps: int, extra=()):
    return compose_cfg([
        "callbacks=eval", f"trainer.max_steps={steps}", "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.on_train_end=false", f"callbacks.fid.every_n_steps={steps // 2}",
        "callbacks.fid.num_samples=64", "callbacks.fid.batch_size=32", "callbacks.fid.feature_extractor=digits-classifier",
        "callbacks.model_checkpoint.every_n_train_steps=1000", *extra,
    ])


def test_callback_logs_val_fid_and_keeps_the_best_checkpoint(compose_cfg):
    from diffusion_lab.cli.train import train

    cfg = fid_cfg(compose_cfg, 40)
    metrics = train(cfg)
    assert metrics["val/fid"] > 0 and metrics["val/is"] >= 1
    run = Path(cfg.paths.output_dir)
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val/fid" in header and "val/is" in header
    best = list((run / "checkpoints").glob("best_fid_step_*.ckpt"))
    assert len(best) == 1
    assert torch.load(best[0], weights_only=True)["callbacks"]  # a full Lightning checkpoint


def test_callback_fid_is_the_same_on_one_and_two_processes(tmp_path):
    """The same 64 images (by seed, index), drawn by 1 or by 2 gloo processes, give the same FID."""
    script = Path(__file__).with_name("ddp_fid_worker.py")
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"fid_{devices}.json"
        proc = subprocess.run([sys.executable, str(script), str(devices), str(out)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    print(results)
    assert results[1]["fid"] == pytest.approx(results[2]["fid"], rel=1e-6)
    assert results[1]["is"] == pytest.approx(results[2]["is"], rel=1e-6)


def test_eval_command_writes_a_resumable_report(digits_checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = eval_command(digits_checkpoint, out, tmp_path / "data", "num_samples=64", "batch_size=32",
                        "grid.samplers=[{sampler: ddim, eta: 0.0},{sampler: ddim, eta: 1.0},"
                        "{sampler: ddpm, variance: fixed_large, steps: [5]},"
                        "{sampler: dpm_solver, clip_denoised: true, steps: [5]}]",
                        "grid.steps=[5,10]",
                        "metrics.kid_subset_size=32")
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert {"checkpoint", "data", "extractor", "num_samples", "seed", "reference", "versions", "cells",
            "wall_seconds"} <= set(report)
    assert len(report["checkpoint"]["sha256"]) == 64 and report["extractor"] == "digits-classifier"
    assert len(report["cells"]) == 6
    for cell in report["cells"]:
        assert cell["num_samples"] == 64 and {"fid", "is", "kid"} <= set(cell["metrics"])
        assert cell["nfe"] == cell["sampler"]["num_steps"]  # no rounding duplicates at these step counts
    table = (out / "report.md").read_text()
    assert "| DDIM eta=0 |" in table and "| DDIM eta=1 |" in table and "| DPM-Solver++(2M), clip_denoised=True |" in table
    assert "| sampler \\ S | 5 | 10 |" in table
    with Image.open(out / "fid_vs_nfe.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300

    # a second run finds every cell done and recomputes nothing
    before = (out / "report.json").read_text()
    second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0 and "resuming: 6 finished cells" in second.stderr + second.stdout
    assert json.loads((out / "report.json").read_text())["cells"] == json.loads(before)["cells"]


def test_eval_builds_reference_statistics_ahead_of_time(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.evaluate", "build_reference=true",
                             f"paths.data_dir={tmp_path}", "data.limit=200"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "reference_stats" / "digits-train-8px-digits-classifier.pt").is_file()
