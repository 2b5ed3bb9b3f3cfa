"""``val/bpd`` during training: the variational bound in bits/dim of the EMA model on the first N training images.

Distributed like :class:`~diffusion_lab.callbacks.evaluation.FIDEvaluation`: rank r scores images r, r + W, ...;
per-image results are gathered and put back in index order, and image i's noise depends only on (seed, i),
so the number is the same on 1 process or N. Logged as ``val/bpd`` (and ``val/bpd_decoder``, the L_0 part).
"""

from __future__ import annotations

import lightning as L
import torch

from diffusion_lab.callbacks.schedule import ScheduledCallback, check_count
from diffusion_lab.diffusion.gaussian import VARIANCES
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.likelihood import bits_per_dim, dataset_images


class BPDEvaluation(ScheduledCallback):
    """Every ``every_n_steps`` (and at the end): the bound of ``num_images`` images with T network calls each.

    ``enabled=false`` switches it off as a whole (eval.yaml lists it, off, so that one override turns it on).
    """

    def __init__(
        self,
        enabled: bool = False,
        every_n_steps: int = 10000,
        num_images: int = 256,
        seed: int = 0,
        batch_size: int = 256,
        variance: str | None = None,
        clip_denoised: bool = True,
        quantization_levels: int | None = None,
        on_train_end: bool = True,
    ) -> None:
        super().__init__("callbacks.bpd", every_n_steps, (), on_train_end)
        check_count("callbacks.bpd.num_images", num_images, 1, 256)
        check_count("callbacks.bpd.batch_size", batch_size, 1, 256)
        if variance is not None and variance not in VARIANCES:
            raise ConfigError(f"callbacks.bpd.variance={variance!r}: use one of {', '.join(VARIANCES)}, "
                              "or null for the model's own")
        self.enabled, self.num_images = bool(enabled), num_images
        self.seed, self.batch_size, self.variance, self.clip_denoised = seed, batch_size, variance, clip_denoised
        self.quantization_levels = quantization_levels
        self.images: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled:  # a num_images larger than the data set fails now, before training
            trainer.datamodule.setup("fit")
            available = len(trainer.datamodule.train_set)
            if self.num_images > available:
                raise ConfigError(f"callbacks.bpd.num_images={self.num_images}, but the training set has {available} "
                                  f"images; choose 1..{available}")
            self.images = dataset_images(trainer.datamodule, "train", self.num_images)
            if self.quantization_levels is None:
                self.quantization_levels = getattr(trainer.datamodule, "quantization_levels", None)

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> None:
        self.run(trainer, pl_module, log=not at_end)

    def evaluations_per_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """T network calls for each of this rank's images."""
        return len(self._indices(trainer)) * pl_module.diffusion.num_timesteps

    def _indices(self, trainer: L.Trainer) -> range:
        """Rank r scores images r, r + W, ..."""
        return range(trainer.global_rank, self.num_images, trainer.world_size)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> dict[str, float]:
        """One evaluation now (the schedule calls it; so can a script); ``log=False`` where self.log is not allowed."""
        assert self.images is not None
        world = trainer.world_size
        indices = list(self._indices(trainer))
        with self.clock.measure(len(indices) * pl_module.diffusion.num_timesteps):
            result = bits_per_dim(pl_module.ema_net, pl_module.diffusion, self.images[indices], indices,
                                  seed=self.seed, batch_size=self.batch_size,
                                  quantization_levels=self.quantization_levels, variance=self.variance,
                                  clip_denoised=self.clip_denoised, device=pl_module.device)
        per_image = torch.stack([result.total, result.terms[:, 0]], dim=1)  # (n_rank, 2)
        if world > 1:
            per_image = self._gather(pl_module, per_image)
        values = {"val/bpd": per_image[:, 0].mean().item(), "val/bpd_decoder": per_image[:, 1].mean().item()}
        self.history.append({"step": trainer.global_step, **values})
        if log:  # for a ModelCheckpoint(monitor="val/bpd"); self.log is not allowed at the end of training
            for name, value in values.items():
                pl_module.log(name, value, sync_dist=False, rank_zero_only=False, logger=False)
        if trainer.is_global_zero:  # straight to the loggers, whatever log_every_n_steps is
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
        return values

    def _gather(self, pl_module: L.LightningModule, per_image: torch.Tensor) -> torch.Tensor:
        """All ranks' rows in global index order (rank r holds images r, r + W, ...)."""
        world, n = pl_module.trainer.world_size, len(self.images)  # type: ignore[arg-type]
        size = -(-n // world)
        padded = torch.cat([per_image, per_image.new_zeros(size - len(per_image), per_image.shape[1])])
        gathered = pl_module.all_gather(padded.to(pl_module.device)).cpu()  # (W, size, 2)
        return gathered.transpose(0, 1).reshape(world * size, -1)[:n]
