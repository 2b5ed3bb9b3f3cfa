"""Resuming: which checkpoint a ``ckpt_path`` means, whether it fits the run, whether there is anything left to
train, which checkpoint to go back to after a blow-up, and the callbacks that make a resume do what was asked (the
final state always in ``last.ckpt``, a learning rate given on resume replacing the restored one).

The file format itself (atomic writes, safe reads) is :mod:`diffusion_lab.training.checkpoint_io`; rebuilding a
module from a checkpoint is :mod:`diffusion_lab.training.checkpoints`.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffusion_lab.errors import CheckpointError, CheckpointNotFoundError
from diffusion_lab.training.checkpoint_io import load_checkpoint
from diffusion_lab.training.run_status import read_status

log = logging.getLogger(__name__)


# --- which checkpoint ckpt_path means --------------------------------------------------------------------
def resolve_resume(ckpt_path: str | None, log_dir: str | Path, task_name: str,
                   current_run: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint file the ``ckpt_path`` config value means and its content (read once), or None for a fresh run.

    - ``last``: the newest run of ``task_name`` under ``log_dir`` (the one started last among those that began
      training; not ``current_run``), and in it its newest whole checkpoint (:func:`newest_whole_checkpoint`).
      When that run has none (e.g. its loss went NaN before the first save), an earlier run is *not* continued
      silently: :class:`CheckpointNotFoundError` names the run, and the ckpt_path of an earlier run's checkpoint;
    - a run folder (or its checkpoints folder): its newest whole checkpoint;
    - a file: itself.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        task_dir = Path(log_dir) / task_name
        runs = runs_newest_first(task_dir, exclude=current_run)
        if not runs:
            raise CheckpointNotFoundError(
                f"ckpt_path=last, but no earlier run of {task_name!r} under {task_dir} has a checkpoint; "
                "start without ckpt_path, or give a run folder or .ckpt file")
        found, problems = newest_whole_checkpoint(runs[0])
        if found is None:
            raise CheckpointNotFoundError(_newest_run_has_none(task_name, runs[0], problems, runs[1:]))
        log.info("ckpt_path=last: resuming from %s (step %d), the newest whole checkpoint of the newest run of %r, %s",
                 found[0], found[1]["global_step"], task_name, runs[0])
        return found
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        found, problems = newest_whole_checkpoint(path)
        if found is None:
            why = f": {problems[0]}" if problems else ""
            raise CheckpointNotFoundError(
                f"ckpt_path={ckpt_path!r} is a folder without a whole checkpoint (checkpoints/last.ckpt or "
                f"checkpoints/step_*.ckpt{why}); give a run folder that has one, or a .ckpt file")
        log.info("ckpt_path=%s: resuming from %s (step %d), the folder's newest whole checkpoint", ckpt_path,
                 found[0], found[1]["global_step"])
        return found
    if not path.is_file():
        raise CheckpointNotFoundError(f"ckpt_path={ckpt_path!r} does not exist; use 'last', a run folder or a .ckpt file")
    checkpoint = load_checkpoint(path)  # truncated / text / unsafe files fail here with one clear message
    log.info("Resuming from %s (step %d)", path, checkpoint["global_step"])
    return path, checkpoint


def _claimed_step(path: Path) -> int:
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else -1


def newest_whole_checkpoint(folder: str | Path) -> tuple[tuple[Path, dict[str, Any]] | None, list[str]]:
    """The checkpoint with the highest global step among ``last.ckpt`` and ``step_*.ckpt`` that loads, and the
    problems of the files that did not (a truncated ``last.ckpt`` gives way to the newest whole ``step_*.ckpt``; a
    kill during the first save of ``last.ckpt`` leaves only its partial temp file, which is no candidate).

    ``last.ckpt`` is read first (its step is inside it); a ``step_*.ckpt`` is read only if its name promises a
    higher step, so usually one file is read.
    """
    folder = Path(folder)
    folder = folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder
    problems: list[str] = []

    def read(path: Path) -> dict[str, Any] | None:
        try:
            return load_checkpoint(path)
        except CheckpointError as error:
            log.warning("Not resuming from %s: %s", path, error)
            problems.append(str(error))
            return None

    best = None
    last = folder / "last.ckpt"
    if last.is_file() and (checkpoint := read(last)) is not None:
        best = (last, checkpoint)
    for path in sorted(folder.glob("step_*.ckpt"), key=_claimed_step, reverse=True):
        if best is not None and _claimed_step(path) <= best[1]["global_step"]:
            break
        checkpoint = read(path)
        if checkpoint is not None and (best is None or checkpoint["global_step"] > best[1]["global_step"]):
            best = (path, checkpoint)
    return best, problems


def runs_newest_first(task_dir: Path, exclude: str | Path | None = None) -> list[Path]:
    """Run folders under ``task_dir`` (``<date>_<time>/`` and sweeps' ``multirun_<date>/<n>/``) that began training,
    the last started first (``status.json``'s start time; the folder's mtime for runs without one)."""
    found = {p.parent for pattern in ("*/status.json", "*/*/status.json", "*/checkpoints", "*/*/checkpoints")
             for p in task_dir.glob(pattern)}
    exclude = Path(exclude).resolve() if exclude is not None else None
    runs = [run for run in found if run.resolve() != exclude and _began_training(run)]
    return sorted(runs, key=lambda run: (_started(run), run.name), reverse=True)


def _status(run: Path) -> dict[str, Any]:
    try:
        return read_status(run) or {}
    except (OSError, ValueError):
        return {}


def _began_training(run: Path) -> bool:
    """Runs that stopped at start-up (a config error, a refused resume) are not runs to continue."""
    return bool(_status(run).get("training_started_at")) or any((run / "checkpoints").glob("*.ckpt"))


def _started(run: Path) -> float:
    try:
        return datetime.fromisoformat(_status(run)["started_at"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return run.stat().st_mtime


def _newest_run_has_none(task_name: str, newest: Path, problems: list[str], earlier: list[Path]) -> str:
    status = _status(newest)
    how = f" ({status.get('status')}: {_short(status['error'])})" if status.get("error") else ""
    what = f"no whole checkpoint ({problems[0]})" if problems else "no checkpoint"
    message = (f"ckpt_path=last: the newest run of {task_name!r}, {newest}{how}, has {what}, and an earlier run is "
               "not continued on a guess.")
    for run in earlier:
        found, _ = newest_whole_checkpoint(run)
        if found is not None:
            return (f"{message} To continue the earlier run {run} from step {found[1]['global_step']}, give "
                    f"ckpt_path={found[0]}; or start without ckpt_path")
    return f"{message} Start without ckpt_path"


def _short(error: str, limit: int = 120) -> str:
    first = error.split("; ", 1)[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


# --- whether there is anything left to train ---------------------------------------------------------------
def finished(step: int, max_steps: int | None) -> bool:
    """A checkpoint at or past ``trainer.max_steps`` (when that is a step limit, > 0) leaves nothing to train."""
    return max_steps is not None and int(max_steps) > 0 and step >= int(max_steps)


BOOKKEEPING = {".hydra", "status.json", "config.yaml"}  # and Hydra's <job>.log


def remove_if_bookkeeping(run_dir: str | Path) -> bool:
    """Delete ``run_dir`` if it holds nothing but Hydra's and this project's bookkeeping (a run that trained
    nothing); True if it did. Log files in it are closed first."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir() or any(p.name not in BOOKKEEPING and p.suffix != ".log" for p in run_dir.iterdir()):
        return False
    for handler in list(logging.root.handlers):
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == run_dir:
            logging.root.removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


# --- after a blow-up: the checkpoint to go back to --------------------------------------------------------
LOSS_RISE = 3.0    # a mean loss over 3x the lowest one before it: the training went wrong
NORM_JUMP = 1.25   # a weight norm 25% above the save before it, and
NORM_RATE = 1.01   # growing by more than 1% per step: the weights blew up (normal training grows them slowly)


def nonfinite_advice(start: tuple[str | Path | None, Mapping[str, Any] | None],
                     saved: Mapping[str, Mapping[str, Any] | None], lr: float | None) -> str:
    """What to do after a non-finite loss: the exact ``ckpt_path=... model.optimizer.lr=...`` to resume with.

    ``last.ckpt`` may hold finite but already blown-up weights (resumed, the same NaN comes back). The checkpoints'
    health records (weight norm and mean loss at each save, ``start`` = the run's start: the checkpoint it resumed
    from, or None for fresh weights) are walked in step order; the first one whose loss rose (``LOSS_RISE``) or
    whose weight norm jumped (``NORM_JUMP`` and ``NORM_RATE`` per step) since the one before ends the sane part,
    and the advice names the last sane checkpoint still on disk, or says that none is safe and the run must start
    again with a lower learning rate (a tenth of ``lr``).
    """
    lower = f"model.optimizer.lr={lr / 10:g}" if lr else "model.optimizer.lr=<lower>"
    records = [(None if p is None else str(p), dict(h)) for p, h in [start, *saved.items()] if h]
    records.sort(key=lambda r: (r[1]["step"], r[0] is not None and Path(r[0]).name == "last.ckpt"))
    safe: tuple[str | None, dict[str, Any]] | None = None
    prev: dict[str, Any] | None = None
    lowest, blowup = math.inf, None
    for path, health in records:
        blowup = _blowup(health, prev, lowest)
        if blowup:
            break
        if (path is None or Path(path).is_file()) and (safe is None or health["step"] > safe[1]["step"]):
            safe = (path, health)
        prev = health
        if health.get("loss") is not None:
            lowest = min(lowest, health["loss"])
    replaced = "a changed lr replaces the one the checkpoint restores"
    if safe is None or safe[0] is None:
        why = f"before the blow-up ({blowup})" if blowup else "before it"
        return (f"No checkpoint was written {why}: start again without ckpt_path and with a lower learning rate, "
                f"{lower} (or check the data for NaN/inf).")
    path, health = safe
    if blowup:
        return (f"The weights blew up before the loss did ({blowup}); resume from the last checkpoint before that "
                f"with a lower learning rate: ckpt_path={path} {lower} ({replaced}).")
    return (f"The checkpoints' weight norm and loss look sane up to the last one (step {health['step']}); resume from "
            f"it with a lower learning rate: ckpt_path={path} {lower} ({replaced}; if the loss is non-finite again "
            "at once, check the data for NaN/inf).")


def _blowup(health: Mapping[str, Any], prev: Mapping[str, Any] | None, lowest: float) -> str | None:
    step, norm, loss = health["step"], health.get("weight_norm"), health.get("loss")
    if norm is None or not math.isfinite(norm):
        return f"weight norm {norm} at step {step}"
    if loss is not None and (not math.isfinite(loss) or loss > LOSS_RISE * lowest):
        return f"the mean loss rose to {loss:.3g} by step {step}, from {lowest:.3g}"
    if prev is not None:
        ratio, steps = norm / prev["weight_norm"], max(1, step - prev["step"])
        if ratio > max(NORM_JUMP, NORM_RATE ** steps):
            return f"the weight norm went from {prev['weight_norm']:.3g} at step {prev['step']} to {norm:.3g} at step {step}"
    return None


# --- whether the checkpoint fits the run --------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``['model.net.ch: 32 in the checkpoint, 64 now', ...]`` over the given top-level sections."""
    a = _flatten({k: old.get(k) for k in sections})
    b = _flatten({k: new.get(k) for k in sections})
    # A key one side lacks counts as null: a field added later with a null default (e.g. model.net.num_classes)
    # is what a checkpoint written before it meant, so older checkpoints still resume.
    return [
        f"{key}: {a.get(key, 'unset')!s} in the checkpoint, {b.get(key, 'unset')!s} now"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def check_resume_compatible(checkpoint: Mapping[str, Any], module: torch.nn.Module, run_config: Mapping[str, Any],
                            source: str | Path) -> None:
    """Refuse to resume when the checkpoint's weights do not fit ``module``, naming the config values that differ."""
    own = module.state_dict()
    theirs = checkpoint["state_dict"]
    mismatched = sorted(
        k for k in set(own) | set(theirs)
        if k not in own or k not in theirs or tuple(own[k].shape) != tuple(theirs[k].shape)
    )
    if not mismatched:
        return
    old = (checkpoint.get("diffusion_lab") or {}).get("config") or {}
    differences = [d for d in config_differences(old, run_config, ("model", "diffusion")) if ".optimizer." not in d
                   and ".lr_scheduler." not in d]
    what = "; ".join(differences[:8]) if differences else f"{len(mismatched)} tensors differ, e.g. {mismatched[0]}"
    raise CheckpointError(
        f"cannot resume from {source}: it was trained with a different model config ({what}). Resume with the "
        "checkpoint's values (its run folder's config.yaml has them), or start a fresh run without ckpt_path"
    )


class FinalCheckpoint(L.Callback):
    """Write ``last.ckpt`` at the end of training when the last periodic save was at an earlier step, *before* any
    other callback's end-of-training work.

    Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only alongside its periodic saves (and at
    the end only if it never wrote one), so a 280-step run with saves every 25 steps would end with last.ckpt at
    step 275. And Lightning runs the checkpoint callbacks' ``on_train_end`` last, after the sample grid, FID and
    bits/dim callbacks have done their end-of-training work: one of those failing would lose the final state. This
    callback is not a ``Checkpoint`` (Lightning keeps its place in the list); put it first.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if (isinstance(callback, ModelCheckpoint) and callback.save_last
                    and callback._last_global_step_saved != trainer.global_step):
                # The callback's own "last" writer (its file name, link/copy mode and state), at the final step.
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                log.info("Saved the final checkpoint %s (step %d)", callback.last_model_path, trainer.global_step)


class ResumeLearningRate(L.Callback):
    """On resume, replace the restored learning rate with ``lr`` (the run's ``model.optimizer.lr``), logged.

    A resume restores the optimizer's param groups and the LR schedule's ``base_lrs``, so a lower
    ``model.optimizer.lr`` on the command line would otherwise be ignored. Every param group's current lr is
    rescaled by ``lr / initial lr`` (so a warm-up or decay keeps its shape, now relative to the new base) and the
    schedule's ``base_lrs`` become ``lr``.
    """

    def __init__(self, lr: float, restored_lr: float | None) -> None:
        self.lr, self.restored_lr = float(lr), restored_lr

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                base = group.get("initial_lr", self.restored_lr) or group["lr"]
                group["lr"] = group["lr"] * self.lr / base if schedulers else self.lr
                if "initial_lr" in group:
                    group["initial_lr"] = self.lr
        for scheduler in schedulers:
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [self.lr for _ in scheduler.base_lrs]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        log.warning(
            "Resumed with model.optimizer.lr=%g: the checkpoint's learning rate (%s) in the optimizer and the LR "
            "schedule's base rate were replaced (current lr at step %d: %s)",
            self.lr, "unknown" if self.restored_lr is None else f"{self.restored_lr:g}", trainer.global_step,
            ", ".join(f"{g['lr']:.3g}" for o in trainer.optimizers for g in o.param_groups),
        )
