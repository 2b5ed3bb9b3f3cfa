"""A PNG grid of EMA samples at scheduled steps and at the end of training, logged to every logger that takes images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.progress import SamplingClock, count_due
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import grid_image, save_grid

log = logging.getLogger(__name__)


class SampleGrid(L.Callback):
    """Samples ``num_images`` images from the same fixed noise each time, so grids from different steps compare.

    A grid is drawn at every multiple of ``every_n_steps`` (0: none), at each step listed in ``at_steps`` (early
    previews, e.g. ``[250, 500]``) and, with ``on_train_end``, when training ends.
    Files: ``<dirpath>/step_<global step>.png`` and a copy of the newest as ``<dirpath>/last.png``.
    ``sampler`` overrides the module's configured sampler (e.g. a 20-step DPM-Solver++ for cheap previews).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 1000,
        num_images: int = 64,
        sampler: Sampler | None = None,
        seed: int = 0,
        on_train_end: bool = True,
        at_steps: Sequence[int] = (),
    ) -> None:
        if every_n_steps < 0 or any(s < 1 for s in at_steps):
            raise ValueError(f"callbacks.sample_grid: every_n_steps must be >= 0 (0: never) and at_steps >= 1, got "
                             f"every_n_steps={every_n_steps}, at_steps={list(at_steps)}")
        self.dirpath, self.every_n_steps, self.num_images = Path(dirpath), every_n_steps, num_images
        self.at_steps = sorted(set(int(s) for s in at_steps))
        self.sampler, self.seed, self.at_train_end = sampler, seed, on_train_end
        self.clock = SamplingClock()
        self._last_step = -1

    def is_due(self, step: int) -> bool:
        """Whether the schedule (every_n_steps, at_steps) draws a grid after optimizer step ``step``."""
        return (self.every_n_steps > 0 and step % self.every_n_steps == 0) or step in self.at_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.is_due(step) and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    def remaining_evaluations(self, trainer: L.Trainer, pl_module: L.LightningModule, last_step: int) -> int:
        """Single-image network evaluations this callback will still run after the current step up to ``last_step``."""
        if trainer.global_rank != 0:
            return 0
        grids = count_due(self.every_n_steps, self.at_steps, trainer.global_step, last_step)
        if self.at_train_end and not self.is_due(last_step):
            grids += 1
        nfe = len((self.sampler or pl_module.sampler).visited(pl_module.diffusion))
        return grids * self.num_images * nfe

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
        self._last_step = step
        sampler = self.sampler or pl_module.sampler
        with self.clock.measure(self.num_images * len(sampler.visited(pl_module.diffusion))):
            # A private generator: the grid sees the same noise each time and leaves the training RNG untouched.
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            images = pl_module.sample(self.num_images, sampler=sampler, generator=generator)
            path = save_grid(images, self.dirpath / f"step_{step:07d}.png")
            save_grid(images, self.dirpath / "last.png")
        log.info("step %d: sample grid %s (%s, %.1f s)", step, path, _describe(sampler, pl_module), self.clock.last)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                grid = np.array(grid_image(images))  # the same padded picture as the PNG
                logger.experiment.add_image("samples/grid", grid, global_step=step,
                                            dataformats="HW" if grid.ndim == 2 else "HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [str(path)], step=step)
        return path


def _describe(sampler: Sampler, pl_module: L.LightningModule) -> str:
    """E.g. ``ddpm, 1000 steps``: what drew a grid, for the log."""
    return f"{sampler.name}, {len(sampler.visited(pl_module.diffusion))} steps"
