"""The console during training: global step out of ``max_steps``, loss, latest ``val/*``, elapsed time and an ETA.

On a terminal it is one tqdm bar (Lightning's ``TQDMProgressBar``, counting optimizer steps over the whole run
instead of batches per epoch); when stdout is not a terminal (CI, ``nohup``, SLURM) it draws nothing and writes
one plain line every ``trainer.log_every_n_steps`` steps instead. Either way the same lines go through
:mod:`logging` (logger ``diffusion_lab.callbacks.progress``), so the run folder's ``train.log`` holds them; on a
terminal they carry ``console=False`` and :class:`ConsoleFilter` keeps them off the screen, where the bar
already shows them.

The ETA is the project's own estimate, not tqdm's: :mod:`diffusion_lab.callbacks.eta` computes it from the
measured step rate and the work the sampling callbacks (sample grids, FID, bits/dim) still have to do; this
module gathers those numbers from the trainer and draws them.
"""

from __future__ import annotations

import datetime
import io
import logging
import sys
from time import perf_counter
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from tqdm import tqdm

from diffusion_lab.callbacks.eta import SamplingWork, TimeLeft, time_left
from diffusion_lab.callbacks.schedule import ScheduledCallback, check_count
from diffusion_lab.errors import ConfigError

log = logging.getLogger(__name__)


class ConsoleFilter(logging.Filter):
    """Drops records logged with ``extra={"console": False}`` (progress lines while a bar shows the same)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "console", True)


class _AboveTheBar(io.TextIOBase):
    """A console stream that prints through ``tqdm.write``, so log lines appear above a live bar instead of in it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        tqdm.write(text, file=self.stream, end="")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


def _rate(steps_per_second: float) -> str:
    return f"{steps_per_second:.2f}" if steps_per_second >= 0.1 else f"{steps_per_second:.3f}"


class StepProgressBar(TQDMProgressBar):
    """Progress over the whole run: ``step 120/3000  4%|▍  | [00:21 elapsed, loss 0.0812, val/fid 10.4, ETA 0:08:15]``.

    Args:
        refresh_rate: redraw the bar every this many steps (terminal only; 0: no bar and no progress lines).
        estimate_after: steps after the first at which to log the estimated run time (0: never).
        tty: draw a bar (True) or write plain lines (False); None: a bar exactly when stdout is a terminal.
    """

    BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| [{elapsed} elapsed{postfix}]"

    def __init__(self, refresh_rate: int = 1, estimate_after: int = 20, tty: bool | None = None) -> None:
        check_count("callbacks.progress_bar.refresh_rate", refresh_rate, 0, 1)
        check_count("callbacks.progress_bar.estimate_after", estimate_after, 0, 20)
        if tty not in (None, True, False):
            raise ConfigError(f"callbacks.progress_bar.tty={tty!r}: use true (a live bar), false (plain lines) or "
                              "null (a bar exactly when stdout is a terminal)")
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self.estimate_after, self.tty = estimate_after, tty
        self.total: float = float("inf")
        self._drawing = False
        self._streams: list[tuple[logging.StreamHandler, Any]] = []
        self._first: tuple[float, int, float] | None = None  # (time, step, sampling seconds) after the first step
        self._start = 0.0
        # The metrics shown (loss, val/*) as floats, read from the trainer after the first step, on logging steps and
        # after a sampling callback ran, only: reading a device tensor is a host sync, which every redraw in between
        # would otherwise cost (the bar then shows the loss of the latest logging step).
        self._shown: dict[str, float] = {}
        self._shown_sampling = 0.0  # the sampling callbacks' seconds when _shown was read

    # --- hooks -----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # Run after every other callback, so a step's line already shows the grid/FID that step produced.
        # (A new list: the hook loop that is calling us iterates over the old one.)
        trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.total = float(steps)
        self._start, self._first = perf_counter(), None
        self._drawing = self.is_enabled and (sys.stdout.isatty() if self.tty is None else self.tty)
        self.train_progress_bar = self.init_train_tqdm()
        if not self.is_enabled:
            return
        if self._drawing:
            self._redirect_console_logging()
        net = getattr(pl_module, "net", pl_module)
        batch = getattr(trainer.datamodule, "batch_size", None)
        self._emit(
            f"Training steps {trainer.global_step} -> {self._total_str()}: {trainer.num_training_batches} batches per "
            f"epoch{f' of {batch}' if batch else ''}, "
            f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
            f"{type(trainer.accelerator).__name__.replace('Accelerator', '').lower()} x {trainer.world_size}, "
            f"precision {trainer.precision}; a progress line every {trainer.log_every_n_steps} steps"
        )

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self._desc(0), total=None if self.total == float("inf") else int(self.total),
                    disable=not self._drawing, leave=True, dynamic_ncols=True, file=sys.stdout,
                    bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the whole run: no per-epoch reset

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if not self.is_enabled:
            return
        step = trainer.global_step
        logging_step = step % max(1, trainer.log_every_n_steps) == 0 or step >= self.total
        sampling = self._sampling_seconds(trainer)
        if self._first is None or logging_step or sampling != self._shown_sampling:
            self._shown, self._shown_sampling = self.get_metrics(trainer, pl_module), sampling
        if self._first is None:
            self._first = (perf_counter(), step, self._sampling_seconds(trainer))
        if self._drawing and (step % self.refresh_rate == 0 or step >= self.total):
            bar = self.train_progress_bar
            bar.n = step
            bar.set_description_str(self._desc(step), refresh=False)
            bar.set_postfix_str(", ".join(self._status(trainer, pl_module)), refresh=False)  # tqdm adds ", " before
            bar.refresh()
        if logging_step:
            status = ", ".join([f"{_hms(self._elapsed())} elapsed", *self._status(trainer, pl_module)])
            self._emit(f"{self._desc(step)} ({100 * step / self.total:.0f}%) | {status}", console=not self._drawing)
        if self.estimate_after > 0 and step == self._first[1] + self.estimate_after:
            self._emit(self.estimate(trainer, pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the postfix is set per step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_progress_bar.close()
        self._restore_console_logging()
        if self.is_enabled:
            sampling = self._sampling_seconds(trainer)
            metrics = "".join(f", {k} {v:.4g}" for k, v in self.get_metrics(trainer, pl_module).items())
            self._emit(f"Finished at step {trainer.global_step} in {_hms(self._elapsed())} "
                       f"(sampling callbacks {_hms(sampling)}){metrics}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()
        self._restore_console_logging()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The latest ``train/loss`` and every ``val/*`` metric (FID callbacks put theirs in callback_metrics)."""
        metrics = trainer.callback_metrics
        shown = {"loss": metrics["train/loss"]} if "train/loss" in metrics else {}
        shown.update({k: v for k, v in metrics.items() if k.startswith("val/")})
        return {k: float(v) for k, v in shown.items()}

    # --- the estimate ----------------------------------------------------------------------------------
    def time_left(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TimeLeft | None:
        """The ETA model's answer for now (:func:`~diffusion_lab.callbacks.eta.time_left`), or None before a rate
        is measured or when the total number of steps is not known."""
        if self._first is None or self.total == float("inf"):
            return None
        t0, step0, sampling0 = self._first
        work = [SamplingWork(type(cb).__name__, cb.remaining_evaluations(trainer, pl_module, int(self.total)),
                             cb.clock.seconds_per_evaluation) for cb in self._sampling_callbacks(trainer)]
        return time_left(trainer.global_step - step0, perf_counter() - t0, self._sampling_seconds(trainer) - sampling0,
                         int(self.total) - trainer.global_step, work, getattr(trainer.datamodule, "batch_size", None))

    def estimate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """The start-of-run estimate of the whole run's time, saying what it includes."""
        left = self.time_left(trainer, pl_module)
        if left is None:
            return "No run-time estimate: the total number of steps is not known (trainer.max_steps)"
        done = self._elapsed()
        parts = ", ".join(f"{name} {_hms(s)}" for name, s in left.sampling.items()) or "none"
        measured = " (measured so far)" if any(cb.clock.evaluations for cb in self._sampling_callbacks(trainer)) else (
            " (estimated: one sampling network evaluation ~ 1/3 of a training image's forward+backward)")
        end = datetime.datetime.now().astimezone() + datetime.timedelta(seconds=left.total)
        return (f"Estimated run time {_hms(done + left.total)}, ending about {end:%H:%M %Z}: {_hms(done)} so far + "
                f"{int(self.total) - trainer.global_step} steps left at {_rate(left.steps_per_second)} steps/s "
                f"(measured over steps {self._first[1] + 1}-{trainer.global_step}) {_hms(left.training)} + sampling "
                f"callbacks {parts}{measured}; start-up before the first step and the final checkpoint not included")

    # --- helpers ---------------------------------------------------------------------------------------
    def _desc(self, step: int) -> str:
        return f"step {step}/{self._total_str()}"

    def _total_str(self) -> str:
        return "?" if self.total == float("inf") else str(int(self.total))

    def _status(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """``loss 0.0812``, ``val/fid 10.4``, ``5.80 steps/s``, ``ETA 0:08:15``: what the bar and the lines show (the
        metrics as of the latest logging step)."""
        items = [f"{k} {v:.4g}" for k, v in self._shown.items()]
        left = self.time_left(trainer, pl_module)
        if left is not None:
            items.append(f"{_rate(left.steps_per_second)} steps/s")
        items.append(f"ETA {_hms(left.total)}" if left else "ETA ?")
        return items

    def _elapsed(self) -> float:
        return perf_counter() - self._start

    @staticmethod
    def _sampling_callbacks(trainer: L.Trainer) -> list[ScheduledCallback]:
        return [cb for cb in trainer.callbacks if isinstance(cb, ScheduledCallback)]

    def _sampling_seconds(self, trainer: L.Trainer) -> float:
        return sum(cb.clock.seconds for cb in self._sampling_callbacks(trainer))

    def _emit(self, line: str, console: bool = True) -> None:
        if log.hasHandlers():
            log.info(line, extra={"console": console})
        elif console:  # no logging set up (a notebook, a script): the console is all there is
            print(line, flush=True)

    def _redirect_console_logging(self) -> None:
        """While the bar is drawn, terminal log handlers write above it (tqdm.write) instead of through it."""
        for name in ("", "lightning.pytorch", "lightning.fabric"):
            for handler in logging.getLogger(name).handlers:
                stream = getattr(handler, "stream", None)
                if type(handler) is logging.StreamHandler and getattr(stream, "isatty", lambda: False)():
                    self._streams.append((handler, handler.setStream(_AboveTheBar(stream))))

    def _restore_console_logging(self) -> None:
        while self._streams:
            handler, stream = self._streams.pop()
            handler.setStream(stream)
