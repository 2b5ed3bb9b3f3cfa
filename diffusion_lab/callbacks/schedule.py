"""When a periodic callback runs (the sample grid, FID, bits/dim): every N steps, at listed steps, once at the end.

One place decides, so the three callbacks cannot drift apart: a run is due after optimizer step ``s`` when ``s``
is a multiple of ``every_n_steps`` (0: never) or listed in ``at_steps``, and when training ends with
``on_train_end``; never twice for the same global step (the last periodic step is often also the final one).
The same schedule counts the runs still to come, which the progress bar's ETA budgets.
"""

from __future__ import annotations

from typing import Any, Sequence

import lightning as L

from diffusion_lab.callbacks.eta import SamplingClock
from diffusion_lab.errors import ConfigError


def check_count(key: str, value: object, minimum: int, example: int, hint: str = "") -> None:
    """A callback argument that counts (steps, images): a whole number >= ``minimum``, or a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: must be a whole number >= {minimum}{hint}, e.g. {key}={example}")


def count_due(every_n_steps: int, at_steps: Sequence[int], after: int, until: int) -> int:
    """How many steps s with ``after < s <= until`` are multiples of ``every_n_steps`` (0: none) or in ``at_steps``."""
    multiples = (until // every_n_steps - after // every_n_steps) if every_n_steps > 0 and until > after else 0
    extra = sum(1 for s in set(at_steps) if after < s <= until and not (every_n_steps > 0 and s % every_n_steps == 0))
    return max(0, multiples) + extra


class StepSchedule:
    """``every_n_steps`` / ``at_steps`` / ``on_train_end`` of the callback at config key ``key`` (for messages)."""

    def __init__(self, key: str, every_n_steps: int, at_steps: Sequence[int] = (), on_train_end: bool = True) -> None:
        check_count(f"{key}.every_n_steps", every_n_steps, 0, 1000, " (0: never)")
        bad = [s for s in at_steps if isinstance(s, bool) or not isinstance(s, int) or s < 1]
        if bad:
            raise ConfigError(f"{key}.at_steps={list(at_steps)}: {bad} are not steps >= 1; list optimizer steps, "
                              f"e.g. {key}.at_steps=[250,500] (or [] for none)")
        self.every_n_steps, self.at_steps, self.on_train_end = every_n_steps, sorted(set(at_steps)), bool(on_train_end)
        self.last_step = -1  # the global step of the latest run: a step runs at most once

    def is_due(self, step: int) -> bool:
        """Whether the periodic schedule (every_n_steps, at_steps) runs after optimizer step ``step``."""
        return (self.every_n_steps > 0 and step % self.every_n_steps == 0) or step in self.at_steps

    def due_after_step(self, step: int) -> bool:
        return self.is_due(step) and step != self.last_step

    def due_at_end(self, step: int) -> bool:
        return self.on_train_end and step != self.last_step

    def remaining_runs(self, after: int, last_step: int) -> int:
        """Runs still to come after step ``after`` in a run that ends at ``last_step`` (the end run included)."""
        end = 1 if self.on_train_end and not self.is_due(last_step) else 0
        return count_due(self.every_n_steps, self.at_steps, after, last_step) + end


class ScheduledCallback(L.Callback):
    """A callback that samples on a :class:`StepSchedule`: subclasses say what one run does (:meth:`fire`) and
    how many single-image network evaluations it costs this rank (:meth:`evaluations_per_run`, for the ETA)."""

    enabled = True  # a subclass may switch itself off as a whole (callbacks.bpd.enabled)

    def __init__(self, key: str, every_n_steps: int, at_steps: Sequence[int] = (), on_train_end: bool = True) -> None:
        self.schedule = StepSchedule(key, every_n_steps, at_steps, on_train_end)
        self.clock = SamplingClock()

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> Any:
        raise NotImplementedError

    def evaluations_per_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.enabled and self.schedule.due_after_step(trainer.global_step):
            self._run(trainer, pl_module, at_end=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.schedule.due_at_end(trainer.global_step):
            self._run(trainer, pl_module, at_end=True)

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> None:
        self.schedule.last_step = trainer.global_step
        self.fire(trainer, pl_module, at_end)

    def remaining_evaluations(self, trainer: L.Trainer, pl_module: L.LightningModule, last_step: int) -> int:
        """Single-image network evaluations this rank will still run after the current step up to ``last_step``."""
        if not self.enabled:
            return 0
        runs = self.schedule.remaining_runs(trainer.global_step, last_step)
        return runs * self.evaluations_per_run(trainer, pl_module) if runs else 0
