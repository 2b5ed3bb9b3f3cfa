"""Hydra multirun sweeps end to end: run folders, status of failed runs, the sweep report, Optuna, SLURM configs."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image

from diffusion_lab.reports.sweep import collect_runs, write_sweep_report
from tests.conftest import TINY

# Four steps, FID of 64 DDIM-5 samples at steps 2 and 4: a whole run in a few seconds.
SHORT = TINY + ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "callbacks.fid.every_n_steps=2", "callbacks.sample_grid.every_n_steps=0",
                "callbacks.sample_grid.on_train_end=false", "callbacks.model_checkpoint.every_n_train_steps=0"]


def multirun(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run a multirun with the default sweep folder (runs/<experiment>/multirun_<date>) under tmp_path."""
    args = [sys.executable, "-m", "diffusion_lab.cli.train", "-m", *SHORT, *overrides, f"paths.root_dir={tmp_path}"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    sweeps = list((tmp_path / "runs" / "digits").glob("multirun_*"))
    assert len(sweeps) == 1, result.stderr[-3000:]
    return result, sweeps[0]


def logged(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every row of the run's metrics.csv that has ``metric``, read here with the csv module (not
    with read_metrics, whose results the report's numbers are checked against)."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(int(row["step"]), float(row[metric])) for row in csv.DictReader(f) if row.get(metric)]


def test_multirun_writes_one_folder_per_run_and_the_report_lists_every_run(tmp_path):
    # The third value is a typo: that job fails at start-up, the others still run, and the report shows its error.
    result, sweep_dir = multirun(tmp_path, "diffusion.schedule=linear,cosine,cosinus")
    assert result.returncode != 0  # Hydra re-raises the failed job's error once the sweep is done
    assert "diffusion.schedule='cosinus' is not allowed" in result.stderr

    runs = {r["job"]: r for r in collect_runs(sweep_dir)}
    assert set(runs) == {"0", "1", "2"}
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        run = runs[job]
        assert run["status"] == "completed" and run["wall_seconds"] > 0
        assert f"diffusion.schedule={schedule}" in run["overrides"]
        assert yaml.safe_load((sweep_dir / job / "config.yaml").read_text())["diffusion"]["schedule"] == schedule
        fids = logged(sweep_dir / job, "val/fid")
        assert run["steps"] == 4 and [s for s, _ in fids] == [2, 4] and run["history"]["val/fid"] == fids
        assert run["final"]["val/fid"] == fids[-1][1] and run["best"]["val/fid"] == min(v for _, v in fids)
        # each evaluation logs the wall minutes of training so far: increasing, within the run's wall time
        elapsed = logged(sweep_dir / job, "time/elapsed_min")
        assert [s for s, _ in elapsed] == [2, 4] and 0 < elapsed[0][1] < elapsed[1][1] < run["wall_seconds"] / 60
    assert runs["2"]["status"] == "failed" and "ConfigError" in runs["2"]["error"]

    paths = write_sweep_report(sweep_dir)
    table = paths["markdown"].read_text()
    ranked = table.split("\n## ")[0]  # the ranking table (the sections below have tables of their own)
    rows = [line for line in ranked.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(rows) == 3
    best_job = min(("0", "1"), key=lambda j: runs[j]["best"]["val/fid"])
    assert rows[0].startswith(f"| 1 | {best_job} | `diffusion.schedule=")  # sorted by best val/fid
    assert f"{runs[best_job]['best']['val/fid']:.4g}" in rows[0]
    assert "| failed |" in rows[2] and "cosinus" in rows[2]
    assert "Common overrides:" in table and "trainer.max_steps=4" in table.split("| rank")[0]
    assert "is not allowed" in table.split("## Errors")[1]
    # the curve table: one row per completed run, each evaluation's FID with its wall minutes
    curve = table.split("## val/fid against wall time")[1].split("![")[0]
    assert "| job | overrides | step 2 | step 4 |" in curve
    for job in ("0", "1"):
        (row,) = [line for line in curve.splitlines() if line.startswith(f"| {job} |")]
        fids, elapsed = logged(sweep_dir / job, "val/fid"), logged(sweep_dir / job, "time/elapsed_min")
        assert row.endswith(" | ".join(f"{v:.4g} ({m:.1f} min)" for (_, v), (_, m) in zip(fids, elapsed)) + " |")
    assert "| 2 |" not in curve  # the failed run has no curve

    with open(paths["csv"], newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["job"] for r in records] == [best_job, {"0": "1", "1": "0"}[best_job], "2"]
    assert math.isclose(float(records[0]["best val/fid"]), runs[best_job]["best"]["val/fid"])
    assert records[2]["status"] == "failed" and records[2]["best val/fid"] == ""
    with Image.open(paths["plot"]) as plot:
        assert plot.format == "PNG" and plot.size[0] >= 1500  # val/fid, the training loss, val/fid vs wall time

    cli = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.report", str(sweep_dir), "--metric", "train/loss",
                          "--out", str(tmp_path / "by_loss")], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "sorted by best `train/loss`" in (tmp_path / "by_loss" / "sweep_report.md").read_text()


def test_report_of_a_folder_without_runs_says_what_to_pass(tmp_path):
    cli = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.report", str(tmp_path)], capture_output=True, text=True)
    assert cli.returncode == 2 and "no run folders" in cli.stderr


def test_optuna_sweeper_runs_two_trials_and_reports_the_best_val_fid(tmp_path):
    result, sweep_dir = multirun(tmp_path, "hparams_search=digits_optuna", "hydra.sweeper.n_trials=2",
                                 "hydra.sweeper.sampler.n_startup_trials=1")
    assert result.returncode == 0, result.stderr[-3000:]
    fids = {job: logged(sweep_dir / job, "val/fid")[-1][1] for job in ("0", "1")}
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    # train() returned each run's last val/fid to Optuna, which kept the smaller one
    assert math.isclose(results["best_value"], min(fids.values()), rel_tol=1e-6)
    for job in ("0", "1"):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((sweep_dir / job / ".hydra" / "overrides.yaml").read_text()))
        assert 2e-4 <= float(overrides["model.optimizer.lr"]) <= 2e-3
        assert overrides["diffusion.schedule"] in ("linear", "cosine")
        assert float(overrides["model.ema_decay"]) in (0.99, 0.995, 0.999)
    assert "## Optuna" in write_sweep_report(sweep_dir)["markdown"].read_text()


def test_slurm_launcher_and_multinode_trainer_compose(compose_cfg):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg = compose_cfg(["hydra/launcher=slurm", "trainer=multinode", "experiment=ddpm_cifar10",
                       "hydra.launcher.partition=gpu"], tiny=False)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 8, 8)
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 4320
    assert launcher["submitit_folder"].endswith("/.submitit/%j")
    trainer = cfg.trainer
    assert (trainer.num_nodes, trainer.devices, trainer.strategy, trainer.accelerator) == (2, 8, "ddp", "gpu")


def test_wandb_runs_of_one_sweep_share_a_group(compose_cfg):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    cfg = compose_cfg(["logger=wandb"])
    assert (cfg.logger.wandb.group, cfg.logger.wandb.name) == ("digits", "digits/run")
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = "/somewhere/runs/digits/multirun_2026-01-01_00-00-00"
        cfg.hydra.job.num = 3
    HydraConfig.instance().set_config(cfg)
    assert cfg.logger.wandb.group == "digits/multirun_2026-01-01_00-00-00"
    assert cfg.logger.wandb.name == "digits/multirun_2026-01-01_00-00-00/3"
