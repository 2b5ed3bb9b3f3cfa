"""Issue 21: never lose a run, resume from the right checkpoint, advice after a NaN that works, finished runs.

In-process through ``diffusion_lab.cli.train.train`` with the real configs (conftest's tiny net), except where the
exit status and the run folder Hydra creates are the point (one subprocess)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_lab.cli.train import train
from diffusion_lab.errors import CheckpointNotFoundError
from diffusion_lab.training import NonFiniteLossError
from diffusion_lab.training.checkpoint_io import checkpoint_health, load_checkpoint, temp_files
from diffusion_lab.training.resume import resolve_resume
from diffusion_lab.utils.io import TEMP_MARK
from tests.conftest import TINY, poison_loss

QUIET = ["callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false"]
ROOT = Path(__file__).resolve().parents[2]


def test_a_failing_end_of_training_callback_leaves_last_ckpt_at_the_final_step(compose_cfg, monkeypatch):
    """The sample grid at the end of training fails; last.ckpt must already hold step 7 (saves every 5)."""
    from diffusion_lab.callbacks import SampleGrid

    def broken(self, trainer, pl_module, final=False):
        raise RuntimeError("sample grid failed")

    monkeypatch.setattr(SampleGrid, "write", broken)
    cfg = compose_cfg(["trainer.max_steps=7", "callbacks.model_checkpoint.every_n_train_steps=5",
                       "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=true"])
    with pytest.raises(RuntimeError, match="sample grid failed"):
        train(cfg)
    run = Path(cfg.paths.output_dir)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 7
    assert json.loads((run / "status.json").read_text())["status"] == "failed"


def test_ckpt_path_last_takes_the_newest_runs_newest_whole_checkpoint(compose_cfg, tmp_path, caplog):
    runs = tmp_path / "runs" / "digits"
    every4 = QUIET + ["callbacks.model_checkpoint.every_n_train_steps=4"]
    train(compose_cfg(every4 + ["trainer.max_steps=4"], run_dir=runs / "older"))
    train(compose_cfg(every4 + ["trainer.max_steps=6"], run_dir=runs / "newest"))
    checkpoints = runs / "newest" / "checkpoints"
    path, checkpoint = resolve_resume("last", tmp_path / "runs", "digits", runs / "current")
    assert (path, checkpoint["global_step"]) == (checkpoints / "last.ckpt", 6)

    # A kill during the first write of last.ckpt: its partial temp file, no last.ckpt, a whole step_0000004.ckpt.
    whole = (checkpoints / "step_0000004.ckpt").read_bytes()
    (checkpoints / "last.ckpt").unlink()
    (checkpoints / f"last.ckpt{TEMP_MARK}999999-deadbeef").write_bytes(whole[: len(whole) // 2])
    for ckpt_path in ("last", str(runs / "newest")):
        path, checkpoint = resolve_resume(ckpt_path, tmp_path / "runs", "digits", runs / "current")
        assert (path, checkpoint["global_step"]) == (checkpoints / "step_0000004.ckpt", 4), ckpt_path
    # A truncated last.ckpt gives way to the newest whole step_*.ckpt too (with a warning naming it).
    (checkpoints / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level("WARNING"):
        path, _ = resolve_resume("last", tmp_path / "runs", "digits", runs / "current")
    assert path == checkpoints / "step_0000004.ckpt"
    assert f"Not resuming from {checkpoints / 'last.ckpt'}: checkpoint" in caplog.text
    (checkpoints / "last.ckpt").unlink()

    caplog.clear()
    with caplog.at_level("INFO"):
        train(compose_cfg(every4 + ["trainer.max_steps=6", "ckpt_path=last"], run_dir=runs / "resumed"))
    assert (f"ckpt_path=last: resuming from {checkpoints / 'step_0000004.ckpt'} (step 4), the newest whole checkpoint "
            f"of the newest run of 'digits', {runs / 'newest'}") in caplog.text
    assert load_checkpoint(runs / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert not temp_files(checkpoints)  # the resume removed the killed save's partial file


def test_ckpt_path_last_does_not_silently_continue_an_earlier_run(compose_cfg, tmp_path, monkeypatch):
    """The newest run went NaN before its first save: ckpt_path=last refuses, naming it and the earlier checkpoint."""
    runs = tmp_path / "runs" / "digits"
    every4 = QUIET + ["callbacks.model_checkpoint.every_n_train_steps=4", "trainer.log_every_n_steps=1"]
    train(compose_cfg(every4 + ["trainer.max_steps=4"], run_dir=runs / "good"))
    poison_loss(monkeypatch, at_call=2)
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        train(compose_cfg(every4 + ["trainer.max_steps=4"], run_dir=runs / "nan"))
    monkeypatch.undo()
    expected = (rf"ckpt_path=last: the newest run of 'digits', {re.escape(str(runs / 'nan'))} \(failed: "
                r"NonFiniteLossError: train/loss is not finite at step 1 .*\), has no checkpoint, and an earlier run "
                rf"is not continued on a guess. To continue the earlier run {re.escape(str(runs / 'good'))} from step "
                rf"4, give ckpt_path={re.escape(str(runs / 'good' / 'checkpoints' / 'last.ckpt'))}; or start without")
    with pytest.raises(CheckpointNotFoundError, match=expected):
        train(compose_cfg(every4 + ["trainer.max_steps=8", "ckpt_path=last"], run_dir=runs / "refused"))
    # The refused attempt stopped before training: it is not the newest run for the next attempt.
    with pytest.raises(CheckpointNotFoundError, match=expected):
        resolve_resume("last", tmp_path / "runs", "digits", runs / "next")


def test_resuming_a_finished_run_trains_nothing_and_leaves_no_run_folder(compose_cfg, tmp_path, caplog):
    runs = tmp_path / "runs" / "digits"
    train(compose_cfg(QUIET + ["trainer.max_steps=4"], run_dir=runs / "done"))
    last = runs / "done" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO"):
        assert train(compose_cfg(QUIET + ["trainer.max_steps=4", "ckpt_path=last"], run_dir=runs / "again")) == {}
    assert f"The run is finished: {last} is at step 4, trainer.max_steps=4; nothing to train" in caplog.text
    assert not (runs / "again").exists()

    # The command: exit status 0, and the folder Hydra made (.hydra/, train.log) is gone as well.
    done = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.train", *TINY, *QUIET, "trainer.max_steps=4",
                           f"ckpt_path={runs / 'done'}", f"hydra.run.dir={runs / 'cli'}",
                           f"paths.log_dir={tmp_path / 'runs'}", f"paths.data_dir={tmp_path / 'data'}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "The run is finished" in done.stdout + done.stderr
    assert not (runs / "cli").exists()
    assert sorted(p.name for p in runs.iterdir()) == ["done"]

    # A raised trainer.max_steps continues it.
    train(compose_cfg(QUIET + ["trainer.max_steps=6", "ckpt_path=last"], run_dir=runs / "longer"))
    assert load_checkpoint(runs / "longer" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_the_nan_advice_names_a_checkpoint_from_before_the_blow_up_and_following_it_trains_on(compose_cfg, tmp_path):
    """lr=3 (warm-up over 30 steps) blows the tiny net's weights up within a few steps and the loss goes NaN some
    steps later; last.ckpt then holds finite but blown-up weights. The printed advice, followed literally, trains
    past the old NaN step."""
    runs = tmp_path / "runs" / "digits"
    common = ["trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
              "model.lr_scheduler.warmup_steps=30"] + QUIET
    with pytest.raises(NonFiniteLossError) as info:
        train(compose_cfg(common + ["model.optimizer.lr=3", "trainer.max_steps=40"], run_dir=runs / "blown"))
    message = str(info.value)
    print(message)
    nan_step = int(re.search(r"train/loss is not finite at step (\d+)", message).group(1))
    ckpt, lr = re.search(r"ckpt_path=(\S+) model\.optimizer\.lr=(\S+) ", message).groups()
    assert float(lr) == pytest.approx(0.3)
    chosen = checkpoint_health(load_checkpoint(ckpt))
    newest = checkpoint_health(load_checkpoint(runs / "blown" / "checkpoints" / "last.ckpt"))
    assert Path(ckpt).parent == runs / "blown" / "checkpoints" and chosen["step"] < newest["step"] < nan_step + 1
    assert newest["weight_norm"] > 2 * chosen["weight_norm"]  # last.ckpt's weights had blown up

    train(compose_cfg(common + [f"ckpt_path={ckpt}", f"model.optimizer.lr={lr}", f"trainer.max_steps={nan_step + 4}"],
                      run_dir=runs / "followed"))
    assert load_checkpoint(runs / "followed" / "checkpoints" / "last.ckpt")["global_step"] == nan_step + 4
