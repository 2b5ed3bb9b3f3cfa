"""Checkpoints and resumes: the final state always saved, saves atomic under kill -9, a new lr honoured on resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.cli.train import train
from diffusion_lab.training import NonFiniteLossError
from diffusion_lab.training.checkpoint_io import TEMP_MARK, save_atomic, temp_files
from diffusion_lab.training.checkpoints import load_checkpoint
from tests.conftest import TINY, poison_loss

ROOT = Path(__file__).resolve().parents[2]  # the stall helper runs as tests.integration.stall_save from here
QUIET = ["callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false"]


def test_last_ckpt_holds_the_final_step_when_max_steps_is_not_a_multiple_of_the_save_interval(compose_cfg):
    cfg = compose_cfg(QUIET + ["trainer.max_steps=7", "callbacks.model_checkpoint.every_n_train_steps=5"])
    train(cfg)
    run = Path(cfg.paths.output_dir)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert load_checkpoint(run / "checkpoints" / "step_0000005.ckpt")["global_step"] == 5
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    assert not temp_files(run / "checkpoints")


def test_atomic_save_replaces_whole_files_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic({"global_step": 1, "w": torch.ones(3)}, path)
    save_atomic({"global_step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"global_step": 3, "x": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # and no partial file is left


def train_command(run_dir: Path, tmp_path: Path, *overrides: str, stall: tuple[str, Path] | None = None) -> list[str]:
    """``diffusion-lab-train``; with ``stall=("last.ckpt:8", marker)`` through tests/integration/stall_save.py."""
    entry = ["tests.integration.stall_save", stall[0], str(stall[1])] if stall else ["diffusion_lab.cli.train"]
    return [sys.executable, "-m", *entry, *TINY, *QUIET, f"hydra.run.dir={run_dir}",
            f"paths.log_dir={tmp_path / 'runs'}", f"paths.data_dir={tmp_path / 'data'}", *overrides]


def test_sigkill_during_a_checkpoint_save_keeps_the_previous_last_ckpt_and_the_run_resumes(tmp_path):
    """TMPDIR on another filesystem than the run folder (tmpfs /dev/shm vs tmp_path): the save at step 8 writes half of
    last.ckpt's bytes into its temp file and blocks (the patched writer of tests/integration/stall_save.py); SIGKILL
    then; last.ckpt must still be step 4."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a different filesystem than the test's temp folder")
    tmpdir = Path(tempfile.mkdtemp(dir=shm))
    run = tmp_path / "runs" / "digits" / "killed"
    common = ["trainer.max_steps=12", "callbacks.model_checkpoint.every_n_train_steps=4"]
    env = os.environ | {"TMPDIR": str(tmpdir)}
    marker = tmp_path / "stalled"
    proc = subprocess.Popen(train_command(run, tmp_path, *common, stall=("last.ckpt:8", marker)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, f"training ended before the stalled save: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the save never stalled"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil_rmtree(tmpdir)
    assert proc.returncode == -signal.SIGKILL
    partial = temp_files(run / "checkpoints")
    assert len(partial) == 1 and partial[0].name.startswith(f"last.ckpt{TEMP_MARK}")
    assert 0 < partial[0].stat().st_size < (run / "checkpoints" / "step_0000008.ckpt").stat().st_size
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 4  # intact, and the older state

    resumed = tmp_path / "runs" / "digits" / "resumed"
    done = subprocess.run(train_command(resumed, tmp_path, *common, f"ckpt_path={run}"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 12
    assert not temp_files(run / "checkpoints")  # the resume removed the killed save's leftovers


def shutil_rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def read_column(run_dir: Path, column: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def test_a_new_learning_rate_on_resume_replaces_the_restored_one(compose_cfg, monkeypatch, tmp_path, caplog):
    """The non-finite-loss advice: resume from the step-4 checkpoint with model.optimizer.lr=<a tenth>; it is used."""
    poison_loss(monkeypatch, at_call=7)
    common = ["trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=4",
              "model.lr_scheduler.warmup_steps=10"] + QUIET
    # lr 1e-3 stated here (not the default recipe's, which may change): the advice is a tenth of it
    first = compose_cfg(common + ["trainer.max_steps=12", "model.optimizer.lr=1e-3"],
                        run_dir=tmp_path / "runs" / "digits" / "first")
    with pytest.raises(NonFiniteLossError, match=r"ckpt_path=\S+/first/checkpoints/step_0000004\.ckpt "
                                                 r"model\.optimizer\.lr=0\.0001 "):
        train(first)
    monkeypatch.undo()  # the healthy loss again for the resumed run

    second = compose_cfg(common + ["trainer.max_steps=12", "ckpt_path=last", "model.optimizer.lr=1e-4"],
                         run_dir=tmp_path / "runs" / "digits" / "second")
    with caplog.at_level("WARNING"):
        train(second)
    assert "Resumed with model.optimizer.lr=0.0001: the checkpoint's learning rate (0.001)" in caplog.text
    # Linear warm-up over 10 steps: lr(step) = base * min(step / 10, 1); before the NaN base = 1e-3, after 1e-4.
    before = read_column(tmp_path / "runs" / "digits" / "first", "train/lr")
    after = read_column(tmp_path / "runs" / "digits" / "second", "train/lr")
    assert before[3] == pytest.approx(1e-3 * 3 / 10)
    assert sorted(after) == list(range(4, 12))
    for step, lr in after.items():
        assert lr == pytest.approx(1e-4 * min(step / 10, 1)), step
    last = load_checkpoint(tmp_path / "runs" / "digits" / "second" / "checkpoints" / "last.ckpt")
    assert last["lr_schedulers"][0]["base_lrs"] == [pytest.approx(1e-4)]
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_a_mid_epoch_resume_gives_the_loss_sequence_of_an_uninterrupted_run(compose_cfg, tmp_path):
    """64 images in batches of 16 = 4 steps per epoch; stop at step 6 (epoch 1, batch 2), resume to 11."""
    common = ["trainer.log_every_n_steps=1", "trainer.deterministic=true", "data.limit=64", "data.batch_size=16",
              "callbacks.model_checkpoint.every_n_train_steps=6"] + QUIET
    runs = tmp_path / "runs" / "digits"
    train(compose_cfg(common + ["trainer.max_steps=11"], run_dir=runs / "whole"))
    train(compose_cfg(common + ["trainer.max_steps=6"], run_dir=runs / "first"))
    train(compose_cfg(common + ["trainer.max_steps=11", f"ckpt_path={runs / 'first'}"], run_dir=runs / "second"))
    expected = read_column(runs / "whole", "train/loss")
    got = read_column(runs / "first", "train/loss") | read_column(runs / "second", "train/loss")
    assert sorted(expected) == sorted(got) == list(range(11))
    for step in range(11):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"
    loops = load_checkpoint(runs / "first" / "checkpoints" / "last.ckpt")["loops"]
    state = loops["fit_loop"]["state_dict"]["combined_loader"]  # the loader's position, saved by Lightning
    assert state[0]["epoch"] == 1 and state[0]["batches"] == 2


def test_the_epoch_order_is_a_permutation_that_resumes_where_it_stopped():
    from diffusion_lab.data.sampler import ResumableDataLoader

    data = torch.arange(10)
    loader = ResumableDataLoader(data, batch_size=3, seed=7, drop_last=True)
    loader.sampler.set_epoch(1)
    epoch1 = list(loader)
    assert len(epoch1) == 3 and len(set(torch.cat(epoch1).tolist())) == 9
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state == {"seed": 7, "epoch": 1, "batches": 1}
    other = ResumableDataLoader(data, batch_size=3, seed=0, drop_last=True)
    other.load_state_dict(state)
    assert [b.tolist() for b in other] == [b.tolist() for b in epoch1[1:]]
    loader.sampler.set_epoch(2)
    assert [b.tolist() for b in loader] != [b.tolist() for b in epoch1]  # a new order every epoch
