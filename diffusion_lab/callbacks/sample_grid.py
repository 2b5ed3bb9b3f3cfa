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
from diffusion_lab.diffusion.denoiser import Condition, check_guidance_scale, net_contract
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import grid_image, save_grid

log = logging.getLogger(__name__)


class SampleGrid(ScheduledCallback):
    """Samples ``num_images`` images from the same fixed noise each time, so grids from different steps compare.

    A grid is drawn at every multiple of ``every_n_steps`` (0: none), at each step listed in ``at_steps`` (early
    previews, e.g. ``[250, 500]``) and, with ``on_train_end``, when training ends.
    Files: ``<dirpath>/step_<global step>.png`` and a copy of the newest as ``<dirpath>/last.png``.
    ``sampler`` overrides the module's configured sampler (e.g. a 20-step DPM-Solver++ for cheap previews), and
    ``final_sampler`` the sampler of the last grid of the run (the one drawn at ``trainer.max_steps`` or when training
    ends): cheap previews during the run, the expensive sampler once, for the grid people look at.
    A class-conditional model draws one row per class (``num_images // num_classes`` images each, at
    ``guidance_scale``), so a class the model has not learnt shows as a bad row.
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
        guidance_scale: float = 1.0,
        final_sampler: Sampler | None = None,
    ) -> None:
        super().__init__("callbacks.sample_grid", every_n_steps, at_steps, on_train_end)
        check_count("callbacks.sample_grid.num_images", num_images, 1, 64)
        try:
            self.guidance_scale = check_guidance_scale(guidance_scale)
        except ConfigError as error:
            raise error.at("callbacks.sample_grid") from None
        self.dirpath, self.num_images, self.sampler, self.seed = Path(dirpath), num_images, sampler, seed
        self.final_sampler = final_sampler

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.layout(pl_module)  # a guidance scale an unconditional model cannot use fails before training

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> None:
        self.write(trainer, pl_module, final=at_end or _is_last_step(trainer, trainer.global_step))

    def sampler_for(self, pl_module: L.LightningModule, final: bool) -> Sampler:
        """The sampler of a grid: ``final_sampler`` for the run's last grid (when set), else ``sampler``, else the
        module's own."""
        return (final and self.final_sampler) or self.sampler or pl_module.sampler

    def evaluations_per_run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> int:
        """Only rank 0 draws the grid."""
        if trainer.global_rank != 0:
            return 0
        num_images, cond, _ = self.layout(pl_module)
        branches = 2 if cond is not None and cond.guidance_scale != 1 else 1  # both in one batched forward
        return branches * num_images * len(self.sampler_for(pl_module, final).visited(pl_module.diffusion))

    def remaining_evaluations(self, trainer: L.Trainer, pl_module: L.LightningModule, last_step: int) -> int:
        """As the base class, with the last grid (still to come when ``last_step`` is ahead) at its own sampler."""
        runs = self.schedule.remaining_runs(trainer.global_step, last_step) if self.enabled else 0
        if not runs:
            return 0
        final_left = self.schedule.on_train_end or self.schedule.is_due(last_step)
        if self.final_sampler is None or not final_left:
            return runs * self.evaluations_per_run(trainer, pl_module)
        return (runs - 1) * self.evaluations_per_run(trainer, pl_module) + \
            self.evaluations_per_run(trainer, pl_module, final=True)

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool = False) -> Path:
        step = trainer.global_step
        sampler = self.sampler_for(pl_module, final)
        with self.clock.measure(self.num_images * len(sampler.visited(pl_module.diffusion))):
            # A private generator: the grid sees the same noise each time and leaves the training RNG untouched.
            generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            num_images, cond, nrow = self.layout(pl_module)
            images = pl_module.sample(num_images, sampler=sampler, generator=generator, cond=cond)
            path = save_grid(images, self.dirpath / f"step_{step:07d}.png", nrow=nrow)
            save_grid(images, self.dirpath / "last.png", nrow=nrow)
        log.info("step %d: sample grid %s (%s, %.1f s)", step, path, _describe(sampler, pl_module), self.clock.last)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                grid = np.array(grid_image(images))  # the same padded picture as the PNG
                logger.experiment.add_image("samples/grid", grid, global_step=step,
                                            dataformats="HW" if grid.ndim == 2 else "HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [str(path)], step=step)
        return path

    def layout(self, pl_module: L.LightningModule) -> tuple[int, Condition | None, int | None]:
        """(images, condition, images per row): ``num_images`` unconditional images, or for a conditional net one
        row per class (the first ``num_images`` classes, one image each, when there are more classes)."""
        net = getattr(pl_module, "net", None)  # a module without a net config draws unconditionally
        num_classes = net_contract(net)["num_classes"] if getattr(net, "config", None) is not None else None
        if num_classes is None:
            if self.guidance_scale != 1:
                raise ConfigError(f"callbacks.sample_grid.guidance_scale={self.guidance_scale:g} needs a "
                                  "class-conditional model (model.net.num_classes); this one is unconditional: set "
                                  "callbacks.sample_grid.guidance_scale=1")
            return self.num_images, None, None
        per_row = max(1, self.num_images // num_classes)
        labels = torch.arange(min(num_classes, self.num_images)).repeat_interleave(per_row)
        return len(labels), Condition(labels, self.guidance_scale), per_row


def _is_last_step(trainer: L.Trainer, step: int) -> bool:
    """Whether ``step`` is the run's last optimizer step (a periodic grid there is the final grid)."""
    max_steps = getattr(trainer, "max_steps", -1)
    return max_steps is not None and max_steps > 0 and step >= max_steps


def _describe(sampler: Sampler, pl_module: L.LightningModule) -> str:
    """E.g. ``ddpm, 1000 steps``: what drew a grid, for the log."""
    return f"{sampler.name}, {len(sampler.visited(pl_module.diffusion))} steps"
