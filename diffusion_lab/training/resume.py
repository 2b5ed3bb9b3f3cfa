"""Callbacks that make checkpoints and resumes do what the user asked: the final state always in ``last.ckpt``, and
a learning rate given on resume replacing the restored one."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class FinalCheckpoint(L.Callback):
    """Write ``last.ckpt`` at the end of training when the last periodic save was at an earlier step.

    Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` only alongside its periodic saves (and at
    the end only if it never wrote one), so a 280-step run with saves every 25 steps would end with last.ckpt at
    step 275.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if (isinstance(callback, ModelCheckpoint) and callback.save_last
                    and callback._last_global_step_saved != trainer.global_step):
                # The callback's own "last" writer (its file name, link/copy mode and state), at the final step.
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


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
