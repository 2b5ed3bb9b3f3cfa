"""The LightningModule: the DDPM loss, Adam with warm-up, EMA weights, and logging."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import UserError
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.training.rng import rng_state, set_rng_state


class EMAUpdate:
    """``ema <- decay * ema + (1 - decay) * w`` for AveragedModel's ``multi_avg_fn``.

    The same maths as ``torch.optim.swa_utils.get_ema_multi_avg_fn``, as a picklable object: torch's version is a
    closure, which ``ddp_spawn`` and other multiprocessing launchers cannot pickle.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay

    @torch.no_grad()
    def __call__(self, ema_params: list[Tensor], current_params: list[Tensor], num_averaged: Tensor) -> None:
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, 1 - self.decay)
        else:
            for p_ema, p_model in zip(ema_params, current_params):
                p_ema.copy_(p_ema * self.decay + p_model * (1 - self.decay))


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss (or the weights about to be checkpointed) stopped being finite."""


class DiffusionModule(L.LightningModule):
    """Trains ``net`` on ``diffusion.loss`` and keeps an exponential moving average of its weights.

    The EMA is a :class:`torch.optim.swa_utils.AveragedModel` held by the module itself (``self.ema``), so it
    is part of ``state_dict`` (raw weights under ``net.*``, EMA under ``ema.module.*``), saved in every
    checkpoint, restored on resume and used by :meth:`sample`. Its parameters do not require gradients, so
    DDP neither syncs nor waits for them. ``AveragedModel`` copies the weights at its first update and then
    applies ``ema = decay * ema + (1 - decay) * w`` after every optimizer step from ``ema_start_step`` on.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        sampler: Sampler | None = None,
        ema_decay: float = 0.9999,
        ema_start_step: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {ema_decay}")
        self.net, self.diffusion, self.sampler = net, diffusion, sampler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.ema_decay, self.ema_start_step = ema_decay, ema_start_step
        self.ema = AveragedModel(net, multi_avg_fn=EMAUpdate(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        # A compiled view of the raw net for training; kept out of the module tree so state_dict keys stay clean.
        self.__dict__["_train_net"] = torch.compile(net) if compile else net
        self.run_config: dict | None = None  # the resolved Hydra config, stored in every checkpoint

    # --- training -------------------------------------------------------------------------------------
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        per_example, t = self.diffusion.loss(self._train_net, batch)
        loss = per_example.mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"train/loss is {loss.item()} at step {self.global_step} (batch {batch_idx} of epoch "
                f"{self.current_epoch}); the run stopped and the last checkpoint was left as it was. Check the data for NaN/inf, "
                "or resume with a lower learning rate: ckpt_path=last model.optimizer.lr=<lower> (a changed lr "
                "replaces the one the checkpoint restores; the log says so)."
            )
        self.log("train/loss", loss, prog_bar=True)
        # Loss per timestep quartile: the standard diagnostic (high-t noise prediction is easy, low-t hard).
        quartile = (t * 4) // self.diffusion.num_timesteps
        sums = torch.zeros(4, device=loss.device).scatter_add_(0, quartile, per_example.detach())
        counts = torch.bincount(quartile, minlength=4)
        means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
        for q in range(4):
            self.log(f"train/loss_q{q}", means[q])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.trainer.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            norms = grad_norm(self.net, norm_type=2)
            if norms:
                self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Called once per real optimizer step (also under gradient accumulation); global_step is not yet incremented.
        if self.global_step >= self.ema_start_step:
            self.ema.update_parameters(self.net)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    # --- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [name for name, p in self.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"refusing to checkpoint non-finite weights at step {self.global_step} ({bad[:3]}...); "
                "the previous checkpoint is left intact"
            )
        checkpoint["rng_states"] = rng_state()
        checkpoint["diffusion_lab"] = {"config": self.run_config}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restoring the RNG makes a resumed run draw the same t, noise and shuffling as an uninterrupted one.
        if "rng_states" in checkpoint:
            set_rng_state(checkpoint["rng_states"])

    # --- sampling ------------------------------------------------------------------------------------
    @property
    def ema_net(self) -> nn.Module:
        return self.ema.module

    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        """Draw ``num_images`` images in [-1, 1] with the EMA weights (or the raw ones with ``use_ema=False``)."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError("no sampler configured: pass sampler=... or set the `sampler` config group")
        net = self.ema_net if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
            batch_size = batch_size or num_images
            chunks = [
                sampler.sample(net, self.diffusion, (min(batch_size, num_images - i), *shape), generator=generator,
                               device=self.diffusion.betas.device)
                for i in range(0, num_images, batch_size)
            ]
        finally:
            net.train(was_training)
        # Images, so in [-1, 1] (what a save or a metric would do anyway; unclipped samplers can overshoot).
        return torch.cat(chunks).clamp(-1, 1)
