"""The LightningModule: the DDPM loss, Adam with warm-up, EMA weights, and logging."""

from __future__ import annotations

from typing import Any, Callable, Literal, get_args

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.losses import Objective, objective_for
from diffusion_lab.errors import ConfigError, UserError
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.training.rng import rng_state, set_rng_state


# ``model.compile``: false (eager), true (what configs and checkpoints written before modes existed mean: "default"),
# or a torch.compile mode. "reduce-overhead" adds CUDA graphs (inductor's cudagraph trees) around the compiled
# forward and backward on a GPU; "max-autotune-no-cudagraphs" autotunes the kernels (long compiles) without them.
CompileMode = Literal[False, True, "default", "max-autotune-no-cudagraphs", "reduce-overhead"]
COMPILE_MODES: tuple[bool | str, ...] = get_args(CompileMode)


def compile_mode(value: Any) -> str | None:
    """``model.compile`` -> torch.compile's mode, None for eager; anything else raises :class:`ConfigError`."""
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    allowed = ", ".join(str(m).lower() if isinstance(m, bool) else m for m in COMPILE_MODES)
    raise ConfigError(f"model.compile={value!r} is not allowed; allowed values: {allowed} (true means default)")


def compile_net(net: nn.Module, mode: str) -> nn.Module:
    """``torch.compile(net, mode=mode)``: the one place the training net is compiled (tests swap the backend here)."""
    return torch.compile(net, mode=mode)


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


class EMAModel(AveragedModel):
    """:class:`AveragedModel` whose update never reads its step counter on the host.

    torch's ``update_parameters`` evaluates ``n_averaged == 0`` and ``n_averaged > 0`` as Python booleans: two
    host syncs per training step on a GPU, which stop the CPU from queueing the next step's kernels. This keeps a
    host copy of the counter (read once, at the first update or after a checkpoint is loaded) and does the same
    arithmetic: copy at the first update, then ``multi_avg_fn`` over each (device, dtype) group. ``state_dict``
    (``n_averaged`` included) is unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host_n_averaged: int | None = None

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if not self.use_buffers or self.multi_avg_fn is None:
            self._host_n_averaged = None
            return super().update_parameters(model)
        if self._host_n_averaged is None:
            self._host_n_averaged = int(self.n_averaged)  # one sync: first update, or after loading a checkpoint
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [p.detach() for p in (*model.parameters(), *model.buffers())]
        if len(averaged) != len(current):
            raise ValueError(f"EMA holds {len(averaged)} tensors but the model has {len(current)}")
        if self._host_n_averaged == 0:
            torch._foreach_copy_(averaged, [c.to(a.device) for a, c in zip(averaged, current)])
        else:
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for a, c in zip(averaged, current):
                group = groups.setdefault((a.device, a.dtype), ([], []))
                group[0].append(a)
                group[1].append(c.to(a.device))
            for (device, _), (ema_group, model_group) in groups.items():
                self.multi_avg_fn(ema_group, model_group, self.n_averaged.to(device))
        self.n_averaged += 1
        self._host_n_averaged += 1

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_n_averaged = None  # re-read from the loaded counter at the next update


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss (or the weights about to be checkpointed) stopped being finite.

    ``diagnosis`` is the message without its advice: ``diffusion-lab-train`` replaces the advice with the exact
    checkpoint to resume from (:func:`diffusion_lab.training.resume.nonfinite_advice`).
    """

    def __init__(self, message: str, diagnosis: str | None = None) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis or message


class DiffusionModule(L.LightningModule):
    """Trains ``net`` on its objective (default: the one ``diffusion.loss`` names) and keeps an exponential moving
    average of its weights.

    The EMA is an :class:`EMAModel` (torch's ``AveragedModel`` without its per-step host syncs) held by the
    module itself (``self.ema``), so it is part of ``state_dict`` (raw weights under ``net.*``, EMA under
    ``ema.module.*``), saved in every checkpoint, restored on resume and used by :meth:`sample`. Its parameters
    do not require gradients, so DDP neither syncs nor waits for them. It copies the weights at its first update
    and then applies ``ema = decay * ema + (1 - decay) * w`` after every optimizer step from ``ema_start_step`` on.

    A steady-state step reads nothing on the host (on a GPU each read would be a sync that stops the CPU from
    queueing the next kernels, and CUDA graphs need the host to run ahead): the EMA keeps its own host counter, the
    finite-loss flag stays on the device, clipping is one foreach norm with ``error_if_nonfinite=False``, fused Adam
    keeps its step count on the device, the warm-up is a Python function of the step, and ``train/loss`` is logged
    as a device tensor without ``prog_bar`` (Lightning turns progress-bar metrics into floats every step). The
    quartile losses, the gradient norm, the finite check and (under DDP) Lightning's SIGTERM broadcast run on
    logging steps only (tests/unit/test_step_sync.py runs steady-state steps in a Trainer with every host read refused). That holds for
    ``32-true`` and ``bf16-mixed``; ``16-mixed``'s GradScaler reads its inf check on the host every step.

    ``compile``: see :data:`CompileMode`. Under ``precision=bf16-mixed`` each fp32 weight is cast to bf16 once per
    step, in the forward; the backward reuses the saved bf16 copy. Lightning runs the step under autocast with its
    weight cache off (``cache_enabled=False``: a weight cast under ``no_grad`` would be cached without its grad_fn),
    which costs nothing with one forward per step (tested). No bf16 copies are kept between steps: the weights change
    at every step, so a kept copy would be re-cast every step too; it would only turn one cast kernel per weight into
    one foreach copy, a launch cost that CUDA graphs (``reduce-overhead``) remove anyway.
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
        compile: CompileMode = False,
        channels_last: bool = False,
        objective: Objective | None = None,
        p_uncond: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ConfigError(f"model.p_uncond={p_uncond}: the probability of training on the null class must be in "
                              "[0, 1) (0.1-0.2 for classifier-free guidance, Ho & Salimans 2022)")
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay}: the EMA decay must be in [0, 1) (0.9999 in DDPM; 0.999 "
                              "for short runs)")
        mode = compile_mode(compile)  # refused here, before any start-up work
        self.net, self.diffusion, self.sampler = net, diffusion, sampler
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.ema_decay, self.ema_start_step = ema_decay, ema_start_step
        # NHWC activations and weights: oneDNN (CPU) and cuDNN (tensor cores) run convolutions faster in it.
        self.channels_last = channels_last
        if channels_last:
            net.to(memory_format=torch.channels_last)  # before the EMA copy, so both use it
        self.ema = EMAModel(net, multi_avg_fn=EMAUpdate(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        # A compiled view of the raw net for training; kept out of the module tree so state_dict keys stay clean.
        # Only the net is compiled: t, the noise and the loss are drawn and reduced eagerly around it, so compiled
        # and eager training draw the same random numbers (dropout inside the net aside, under inductor).
        self.compile_mode = mode
        self.__dict__["_train_net"] = net if self.compile_mode is None else compile_net(net, self.compile_mode)
        # The objective (default: the one diffusion.loss names) reads the net only through the denoiser.
        # model.objective (the `objective` config group, a _target_) or, for runs and checkpoints written before
        # objectives were config objects, the one diffusion.loss / loss_weighting / min_snr_gamma name.
        if objective is not None:  # refused at construction, before any start-up work
            objective.check(diffusion)
        self.objective = objective if objective is not None else objective_for(diffusion)
        self.train_denoiser = Denoiser(self._train_net, diffusion)  # a plain object: adds no state_dict keys
        self.num_classes, self.p_uncond = self.train_denoiser.num_classes, p_uncond
        self.run_config: dict | None = None  # the resolved Hydra config, stored in every checkpoint
        # The first step whose loss was not finite (-1: none), kept on the device: a per-step `if not
        # isfinite(loss)` would stall a GPU on a host sync every step, so the flag is read on logging steps and
        # before every checkpoint instead (a non-finite run still stops, and no checkpoint holds its weights).
        # A plain attribute, not a buffer: DDP would broadcast a buffer from rank 0 at every step.
        self._first_nonfinite_step: Tensor | None = None
        # The mean loss since the last save, summed on the device (no sync), and the weight norm: recorded in each
        # checkpoint (``diffusion_lab.health``) so that after a blow-up the advice can name a checkpoint from before
        # it. ``start_health``: the same at the start of training (the initial or the restored weights).
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._health: dict[str, Any] | None = None
        self.start_health: dict[str, Any] | None = None

    # --- training -------------------------------------------------------------------------------------
    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this step's ``on_step`` logs (it does when ``(step + 1) % n == 0``)."""
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if any step so far had a non-finite loss (one host sync)."""
        step = -1 if self._first_nonfinite_step is None else int(self._first_nonfinite_step)
        if step >= 0:
            diagnosis = (f"train/loss is not finite at step {step} (detected at step {self.global_step}); the run "
                         "stopped, and no checkpoint was written after that step.")
            raise NonFiniteLossError(f"{diagnosis} Check the data for NaN/inf, or lower model.optimizer.lr.", diagnosis)

    def training_step(self, batch: Tensor | tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.compile_mode == "reduce-overhead":
            # A new training iteration for cudagraph trees: last step's graph outputs may be overwritten now.
            torch.compiler.cudagraph_mark_step_begin()
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        per_example, t = self.objective(self.train_denoiser, images, self.condition(labels))
        loss = per_example.mean()
        # Record the first non-finite step on the device (no sync); read it on logging steps.
        if self._first_nonfinite_step is None or self._first_nonfinite_step.device != loss.device:
            self._first_nonfinite_step = torch.tensor(-1, device=loss.device)
        flag = self._first_nonfinite_step
        flag.copy_(torch.where((flag < 0) & ~torch.isfinite(loss.detach()), self.global_step, flag))
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None or self._loss_sum.device != value.device else self._loss_sum + value
        self._loss_count += 1
        # The tensor, every step (callback_metrics and a sweep's optimized_metric see the last step's loss), but not
        # prog_bar=True: Lightning converts progress-bar metrics to floats at every step's end, a host sync. The
        # CSV/loggers read it on logging steps, and the progress bar shows the loss of the latest logging step.
        self.log("train/loss", loss)
        if self._is_logging_step():
            self.check_finite()
            # Loss per timestep quartile: the standard diagnostic (high-t noise prediction is easy, low-t hard).
            # Only on logging steps: Lightning would drop the other steps' values anyway.
            quartile = (t * 4) // self.diffusion.num_timesteps
            sums = torch.zeros(4, device=loss.device).scatter_add_(0, quartile, per_example.detach().float())
            counts = torch.bincount(quartile, minlength=4)
            means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
            for q in range(4):
                self.log(f"train/loss_q{q}", means[q])
        return loss

    def condition(self, labels: Tensor | None) -> Condition | None:
        """The training condition: the batch's labels for a conditional net, each replaced by the null class with
        probability ``p_uncond`` (classifier-free guidance training); None for an unconditional net, which ignores
        labels (so labelled data trains an unconditional model exactly as before)."""
        if self.num_classes is None:
            return None
        if labels is None:
            raise ConfigError(f"model.net.num_classes={self.num_classes}, but the data has no class labels; set "
                              "data.source.label_column (Hugging Face sets), use one subfolder per class (folders), "
                              "or train an unconditional net (model.net.num_classes=null)")
        if self.p_uncond > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.p_uncond
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return Condition(labels)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The global gradient norm before clipping, on logging steps only, as one fused (foreach) reduction.
        if self._is_logging_step():
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0))))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Called once per real optimizer step (also under gradient accumulation); global_step is not yet incremented.
        if self.global_step >= self.ema_start_step:
            self.ema.update_parameters(self.net)

    def configure_optimizers(self) -> Any:
        kwargs = {}
        precision_plugin = getattr(self._trainer, "precision_plugin", None)  # None outside a Trainer (a hand loop)
        if getattr(precision_plugin, "scaler", None) is not None:
            # fp16 with a GradScaler: Lightning unscales before clipping, which a fused step (it unscales
            # itself) does not allow; use the foreach kernels there.
            kwargs = {"fused": False, "foreach": True}
        if getattr(self.optimizer_factory, "keywords", {}).get("capturable", False) is None:
            # model.optimizer.capturable=null: on exactly when the step may run under CUDA graphs (reduce-overhead on
            # a GPU). Adam's step count then lives on the device (fused Adam keeps it there either way); it matters
            # for the foreach/for-loop Adam and for capturing the optimizer step itself. CPUs have no capturable Adam.
            device = next(self.net.parameters()).device
            kwargs["capturable"] = self.compile_mode == "reduce-overhead" and device.type == "cuda"
        optimizer = self.optimizer_factory(params=self.net.parameters(), **kwargs)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Lightning's mixed-precision plugin refuses to clip around any optimizer able to unscale gradients
        # itself (fused Adam), even under bf16 where nothing is scaled. Without a GradScaler the gradients are
        # the true ones, so clip them directly (the same global-norm clipping, as one foreach reduction). No host read:
        # the scale min(1, clip / norm) is applied on the device; error_if_nonfinite=True would read the norm (a sync),
        # and a non-finite loss is caught by the on-device flag instead.
        no_scaler = getattr(self.trainer.precision_plugin, "scaler", None) is None
        if gradient_clip_val and no_scaler and gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), gradient_clip_val, foreach=True,
                                           error_if_nonfinite=False)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()
        bad = [name for name, p in self.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            message = f"refusing to checkpoint non-finite weights at step {self.global_step} ({bad[:3]}...); " \
                      "the previous checkpoint is left intact."
            raise NonFiniteLossError(message)
        if self._health is None or self._health["step"] != self.global_step:  # last.ckpt and step_N: one record
            loss = (self._loss_sum / self._loss_count).item() if self._loss_count and self._loss_sum is not None else None
            self._health = self.health(loss)
            self._loss_sum, self._loss_count = None, 0
        checkpoint["rng_states"] = rng_state()
        checkpoint["diffusion_lab"] = {"config": self.run_config, "health": dict(self._health)}

    @torch.no_grad()
    def health(self, loss: float | None = None) -> dict[str, Any]:
        """``{"step", "weight_norm" (global L2 norm of the raw weights), "loss"}``: one host sync."""
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in self.net.parameters()])))
        return {"step": int(self.global_step), "weight_norm": float(norm), "loss": loss}

    def on_train_start(self) -> None:
        self.start_health = self.health()
        self._check_sigterm_on_logging_steps()

    def _check_sigterm_on_logging_steps(self) -> None:
        """Under DDP Lightning (2.6) broadcasts rank 0's SIGTERM flag and reads it on the host before every step
        (``_TrainingEpochLoop._broadcast_sigterm_tensor``): a device sync per step. Do that before logging steps
        only (the same steps on every rank): a SIGTERM still stops every rank together, within
        ``trainer.log_every_n_steps`` steps."""
        loop = getattr(getattr(self._trainer, "fit_loop", None), "epoch_loop", None)
        broadcast = getattr(loop, "_broadcast_sigterm_tensor", None)
        if broadcast is None or getattr(broadcast, "on_logging_steps_only", False):
            return

        def before_logging_steps() -> None:
            if self._is_logging_step():
                broadcast()

        before_logging_steps.on_logging_steps_only = True  # type: ignore[attr-defined]
        loop._broadcast_sigterm_tensor = before_logging_steps

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
        cond: Condition | None = None,
    ) -> Tensor:
        """Draw ``num_images`` images in [-1, 1] with the EMA weights (or the raw ones with ``use_ema=False``);
        ``cond`` holds one class label per image and the guidance scale (conditional nets)."""
        sampler = sampler or self.sampler
        if sampler is None:
            raise ConfigError("no sampler configured: pass sampler=... or set the `sampler` config group")
        net = self.ema_net if use_ema else self.net
        was_training = net.training
        net.eval()
        try:
            shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
            batch_size = batch_size or num_images
            denoiser = Denoiser(net, self.diffusion)
            chunks = [
                sampler.sample(denoiser, None, (min(batch_size, num_images - i), *shape), generator=generator,
                               device=self.diffusion.betas.device,
                               cond=None if cond is None else cond[i:i + batch_size])
                for i in range(0, num_images, batch_size)
            ]
        finally:
            net.train(was_training)
        # Images, so in [-1, 1] (what a save or a metric would do anyway; unclipped samplers can overshoot).
        return torch.cat(chunks).clamp(-1, 1)
