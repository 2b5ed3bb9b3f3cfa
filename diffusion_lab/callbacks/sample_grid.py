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

from diffusion_lab.callbacks.schedule import ScheduledCallback, check_count
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import grid_image, save_grid

log = logging.getLogger(__name__)


class SampleGrid(ScheduledCallback):
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
        super().__init__("callbacks.sample_grid", every_n_steps, at_steps, on_train_end)
        check_count("callbacks.sample_grid.num_images", num_images, 1, 64)
        self.dirpath, self.num_images, self.sampler, self.seed = Path(dirpath), num_images, sampler, seed

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> None:
        self.write(trainer, pl_module)

    def evaluations_per_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Only rank 0 draws the grid."""
        if trainer.global_rank != 0:
            return 0
        return self.num_images * len((self.sampler or pl_module.sampler).visited(pl_module.diffusion))

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
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
