"""The ETA model: from the steps done, the seconds they took and the sampling work still to come, the time left.

Pure arithmetic (no Trainer), so it is tested with numbers; :class:`~diffusion_lab.callbacks.StepProgressBar`
gathers the inputs and draws the result. Training steps go at the rate measured since the first step (which
includes warm-up and is left out), with the time the sampling callbacks (sample grids, FID, bits/dim) spent
taken out of that rate and added back as their own budget: each callback says how many single-image network
evaluations it will still run; their cost is what it measured so far, or before its first run an estimate of
one evaluation as a third of a training image's forward + backward pass (backward costs about twice the
forward). Checkpoint writes are inside the measured training rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
from time import perf_counter
from typing import Iterator, Sequence

# One training image costs about this many network evaluations of sampling: forward + backward (~2 forwards).
TRAIN_STEP_EVALUATIONS_PER_IMAGE = 3


class SamplingClock:
    """Wall time and single-image network evaluations a sampling callback has spent so far."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.evaluations = 0
        self.last = 0.0  # seconds of the latest measured run

    @contextlib.contextmanager
    def measure(self, evaluations: int) -> Iterator[None]:
        start = perf_counter()
        try:
            yield
        finally:
            self.last = perf_counter() - start
            self.seconds += self.last
            self.evaluations += evaluations

    @property
    def seconds_per_evaluation(self) -> float | None:
        return self.seconds / self.evaluations if self.evaluations else None


@dataclasses.dataclass(frozen=True)
class SamplingWork:
    """One sampling callback's work still to come, and what one evaluation cost it so far (None: not run yet)."""

    name: str
    evaluations: int
    seconds_per_evaluation: float | None = None


@dataclasses.dataclass(frozen=True)
class TimeLeft:
    steps_per_second: float
    training: float  # seconds of training steps left
    sampling: dict[str, float]  # {callback name: seconds of sampling left}; callbacks with nothing left are absent

    @property
    def total(self) -> float:
        return self.training + sum(self.sampling.values())


def time_left(steps: int, seconds: float, sampling_seconds: float, steps_left: int,
              work: Sequence[SamplingWork] = (), batch_size: int | None = None) -> TimeLeft | None:
    """The time left after ``steps`` training steps took ``seconds`` of wall time, ``sampling_seconds`` of which
    the sampling callbacks spent; None before a rate is measured. ``batch_size`` (images per step) prices the
    evaluations of a callback that has not run yet; without it such a callback is left out."""
    training_seconds = seconds - sampling_seconds
    if steps <= 0 or training_seconds <= 0:
        return None
    step_seconds = training_seconds / steps
    guess = step_seconds / (TRAIN_STEP_EVALUATIONS_PER_IMAGE * batch_size) if batch_size else None
    sampling: dict[str, float] = {}
    for item in work:
        per_evaluation = item.seconds_per_evaluation if item.seconds_per_evaluation is not None else guess
        if per_evaluation is not None and item.evaluations:
            sampling[item.name] = sampling.get(item.name, 0.0) + item.evaluations * per_evaluation
    return TimeLeft(steps / training_seconds, steps_left * step_seconds, sampling)
