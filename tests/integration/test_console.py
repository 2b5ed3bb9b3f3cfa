"""What a run tells its user: the progress lines, train.log, the grid schedule the README promises, --help, grids."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_lab.callbacks import SampleGrid, StepProgressBar
from diffusion_lab.callbacks.eta import SamplingClock
from diffusion_lab.callbacks.schedule import count_due
from diffusion_lab.utils.images import GRID_BACKGROUND, grid_image
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
# The tiny model of the test suite, but with the progress bar on (TINY switches it off to keep tests quiet).
QUIET = {"~callbacks.progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false"}
SMALL = [o for o in TINY if o not in QUIET]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``diffusion-lab-train`` with stdout piped (not a terminal, as under CI/nohup/SLURM): 6 steps, 2 per epoch.

    The grid schedule is the digits experiment's (at step 500, every 1000) scaled down to at step 3, every 6;
    log_every_n_steps=3 exceeds the 2 batches per epoch, so Lightning warns about it (a Python warning).
    """
    tmp = tmp_path_factory.mktemp("console")
    args = [sys.executable, "-m", "diffusion_lab.cli.train", *SMALL, "data.limit=32", "trainer.max_steps=6",
            "trainer.log_every_n_steps=3", "callbacks.sample_grid.every_n_steps=6",
            "callbacks.sample_grid.at_steps=[3]",
            "callbacks.fid.every_n_steps=6", "callbacks.fid.num_samples=32", "callbacks.fid.batch_size=32",
            "callbacks.fid.sampler.num_steps=2", "callbacks.model_checkpoint.every_n_train_steps=0",
            "callbacks.progress_bar.estimate_after=2", f"paths.root_dir={tmp}"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp / "runs" / "digits").iterdir()
    return result, run


def test_plain_progress_lines_show_step_of_max_steps_loss_fid_and_eta(cli_run):
    result, run = cli_run
    out = result.stdout
    lines = [line for line in out.splitlines() if re.search(r"\] step \d+/6 \(", line)]
    assert [re.search(r"step (\d+)/6", line).group(1) for line in lines] == ["3", "6"]  # every log_every_n_steps
    assert "(50%)" in lines[0] and "(100%)" in lines[1]
    for line in lines:
        assert re.search(r"loss \d\.\d+", line) and re.search(r"ETA \d+:\d\d:\d\d", line) and "elapsed" in line
    # The FID of step 6 runs in the same step's hooks; the bar runs after every other callback, so it shows it.
    assert "val/fid" not in lines[0] and re.search(r"val/fid \d", lines[1])
    assert "\r" not in out  # no redrawn bar in a log file
    # The run folder is named before training starts, and the run-time estimate after the first steps.
    assert out.index(f"Run folder: {run}") < out.index("step 3/6")
    estimate = next(line for line in out.splitlines() if "Estimated run time" in line)
    assert "steps/s (measured over steps 2-3)" in estimate and "SampleGrid" in estimate and "FIDEvaluation" in estimate


def test_train_log_holds_what_the_console_showed(cli_run):
    result, run = cli_run
    log = (run / "train.log").read_text()
    # Every console line (time and level stripped) is in train.log; warnings went through logging, not stderr.
    messages = [re.sub(r"^\[\d\d:\d\d:\d\d \w+\] ", "", line) for line in result.stdout.splitlines()]
    missing = [m for m in messages if m.strip() and m not in log]
    assert not missing, missing[:5]
    for expected in ("Run folder:", "Config: ", "experiment=digits", "Total params", "step 3/6 (50%)",
                     "step 6/6 (100%)", "step 3: sample grid", "step 6: val/fid", "Estimated run time",
                     "`Trainer.fit` stopped: `max_steps=6`", "Finished at step 6"):
        assert expected in log, expected
    assert re.search(r"WARNING py\.warnings\].*smaller than the logging interval", log)
    assert "smaller than the logging interval" not in result.stderr


def test_grid_at_the_step_the_readme_names(cli_run, compose_cfg):
    readme = (ROOT / "README.md").read_text()
    step = int(re.search(r"by step ([\d,]+) the grid shows digit shapes", readme).group(1).replace(",", ""))
    cfg = compose_cfg([], tiny=False)  # the default run: experiment=digits
    grid = SampleGrid(dirpath="unused", every_n_steps=cfg.callbacks.sample_grid.every_n_steps,
                      at_steps=cfg.callbacks.sample_grid.at_steps)
    assert grid.schedule.is_due(step) and step < cfg.trainer.max_steps
    assert cfg.callbacks.progress_bar._target_ == "diffusion_lab.callbacks.StepProgressBar"
    # ... and the schedule works in a real run: the scaled-down schedule wrote exactly its grids.
    _, run = cli_run
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["last.png", "step_0000003.png", "step_0000006.png"]


def test_live_bar_on_a_terminal_counts_global_steps(compose_cfg, capsys, caplog):
    import logging

    from diffusion_lab.cli.train import train

    cfg = compose_cfg(SMALL + ["trainer.max_steps=4", "trainer.log_every_n_steps=2", "callbacks.progress_bar.tty=true",
                               "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false",
                               "~callbacks.fid", "~callbacks.best_fid_checkpoint",
                               "callbacks.model_checkpoint.every_n_train_steps=0",
                               "callbacks.progress_bar.estimate_after=0"], tiny=False)
    with caplog.at_level(logging.INFO, logger="diffusion_lab.callbacks.progress"):
        train(cfg)
    out = capsys.readouterr().out
    assert re.search(r"step 4/4 100%\|.*\| \[\d+:\d\d elapsed, loss \d\.\d+, [\d.]+ steps/s, ETA", out)
    assert "Epoch" not in out
    progress = [r for r in caplog.records if "step 2/4 (50%)" in r.getMessage()]
    assert len(progress) == 1 and progress[0].console is False  # train.log only; the bar shows it on screen


def test_remaining_time_budgets_training_and_sampling(monkeypatch):
    """Closed form: 20 steps in 10 s since the first step, 2979 left; grids still due at 500, 1000, 2000, 3000."""
    import diffusion_lab.callbacks.progress as progress

    bar = StepProgressBar()
    grid = SampleGrid(dirpath="unused", every_n_steps=1000, at_steps=[500], num_images=64)
    sampler = SimpleNamespace(visited=lambda diffusion: list(range(1000)))
    module = SimpleNamespace(sampler=sampler, diffusion=None)
    trainer = SimpleNamespace(global_step=21, global_rank=0, datamodule=SimpleNamespace(batch_size=128),
                              callbacks=[grid, bar])
    bar.total, bar._first = 3000.0, (90.0, 1, 0.0)
    monkeypatch.setattr(progress, "perf_counter", lambda: 100.0)
    left = bar.time_left(trainer, module)
    assert left.training == pytest.approx(2979 / 2.0)
    # Not run yet: one image evaluation ~ a third of a training image's forward+backward (0.5 s / 128 images).
    assert left.sampling == {"SampleGrid": pytest.approx(4 * 64 * 1000 * 0.5 / (3 * 128))}
    # Once it has run, its own measured cost counts, and its time is not charged to the training steps.
    grid.clock.seconds, grid.clock.evaluations = 4.0, 64 * 1000
    trainer.global_step = 501
    left = bar.time_left(trainer, module)
    assert left.training == pytest.approx(2499 / (500 / 6.0))
    assert left.sampling == {"SampleGrid": pytest.approx(3 * 64 * 1000 * 4.0 / 64000)}


@pytest.mark.parametrize("every, at, after, until", [(1000, [500], 0, 3000), (1000, [500, 1000, 2500], 21, 3000),
                                                      (0, [3, 9], 3, 9), (7, [], 5, 100), (5, [5], 10, 10)])
def test_count_due_is_the_count_of_scheduled_steps(every, at, after, until):
    brute = sum(1 for s in range(after + 1, until + 1) if (every > 0 and s % every == 0) or s in at)
    assert count_due(every, at, after, until) == brute


def test_sampling_clock_measures_seconds_per_evaluation(monkeypatch):
    """Runs of 2.5 s for 100 evaluations and 0.5 s for 20 (a stubbed clock): 3 s over 120, 0.025 s each."""
    import diffusion_lab.callbacks.eta as eta

    ticks = iter([10.0, 12.5, 20.0, 20.5])
    monkeypatch.setattr(eta, "perf_counter", lambda: next(ticks))
    clock = SamplingClock()
    assert clock.seconds_per_evaluation is None
    with clock.measure(100):
        pass
    assert (clock.seconds, clock.last, clock.seconds_per_evaluation) == (2.5, 2.5, 0.025)
    with pytest.raises(RuntimeError), clock.measure(20):  # a failed run still costs its time
        raise RuntimeError
    assert (clock.seconds, clock.last, clock.evaluations) == (3.0, 0.5, 120)
    assert clock.seconds_per_evaluation == pytest.approx(0.025)


@pytest.mark.parametrize("size, channels, cell, pad", [(8, 1, 64, 8), (32, 3, 64, 8), (256, 3, 256, 32), (4, 1, 64, 8)])
def test_grid_cells_are_padded_with_grey(size, channels, cell, pad):
    images = torch.ones(4, channels, size, size)  # white: a digit stroke touching every edge of its cell
    array = np.array(grid_image(images, nrow=2))
    assert array.shape[:2] == (2 * cell + 3 * pad, 2 * cell + 3 * pad)
    grey, white = (GRID_BACKGROUND,) * channels, (255,) * channels
    row = array[pad + cell // 2].reshape(-1, channels)  # through the middle of the first row of cells
    expected = [grey] * pad + [white] * cell + [grey] * pad + [white] * cell + [grey] * pad
    assert [tuple(p) for p in row] == expected


def test_help_is_a_short_project_header_with_the_groups_and_examples(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.train", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("diffusion-lab-train: train a denoising diffusion model")
    assert "experiment: ddpm_celebahq256, ddpm_cifar10, ddpm_lsun_church256, digits" in text
    assert "sampler: ddim, ddpm, dpm_solver" in text and "diffusion: cosine, linear, quadratic, sigmoid" in text
    examples = [line for line in text.splitlines() if line.startswith("diffusion-lab-train ")]
    assert len(examples) == 3
    assert "--cfg job" in text and "--hydra-help" in text
    assert "max_steps: 800000" not in text and len(text.splitlines()) < 40  # no config dump
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command, group", [("sample", "sampler"), ("evaluate", "data")])
def test_sample_and_eval_help_name_their_group_options(command, group, tmp_path):
    result = subprocess.run([sys.executable, "-m", f"diffusion_lab.cli.{command}", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    options = sorted(p.stem for p in (ROOT / "diffusion_lab" / "conf" / group).glob("*.yaml"))
    assert f"{group}: {', '.join(options)}" in result.stdout  # the listed options are the shipped ones
    assert len([line for line in result.stdout.splitlines() if line.startswith("diffusion-lab-")]) >= 3
