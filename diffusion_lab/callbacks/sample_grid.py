"""A PNG grid of EMA samples every N steps and at the end of training, logged to every logger that takes images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import save_grid, to_uint8


class SampleGrid(L.Callback):
    """Samples ``num_images`` images from the same fixed noise each time, so grids from different steps compare.

    Files: ``<dirpath>/step_<global step>.png`` and a copy of the newest as ``<dirpath>/last.png``.
    ``sampler`` overrides the module's configured sampler (e.g. a 100-step DDIM for cheap previews).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 1000,
        num_images: int = 64,
        sampler: Sampler | None = None,
        seed: int = 0,
        on_train_end: bool = True,
    ) -> None:
        self.dirpath, self.every_n_steps, self.num_images = Path(dirpath), every_n_steps, num_images
        self.sampler, self.seed, self.at_train_end = sampler, seed, on_train_end
        self._last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        step = trainer.global_step
        self._last_step = step
        # A private generator: the grid sees the same noise each time and leaves the training RNG untouched.
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(self.num_images, sampler=self.sampler, generator=generator)
        path = save_grid(images, self.dirpath / f"step_{step:07d}.png")
        save_grid(images, self.dirpath / "last.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                from torchvision.utils import make_grid

                logger.experiment.add_image("samples/grid", make_grid(to_uint8(images.cpu())), global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [str(path)], step=step)
        return path
