"""Training objectives as objects: ``objective(denoiser, x0, cond=None, generator=None) -> (per_example_loss, t)``.

Each draws t ~ U{0, ..., T-1} and eps ~ N(0, I), forms x_t = q_sample(x0, t, eps) and reads the network only
through the :class:`~diffusion_lab.diffusion.denoiser.Denoiser`, so it works for any prediction type, output
layout or conditioning. GaussianDiffusion keeps the process (schedule, q_sample, posterior, conversions, VB terms).

- :class:`SimpleLoss`: L_simple (Ho et al. 2020 eq. 14), the MSE between the mean part of the output and its
  target (eps, x0 or v, the net's parameterisation), optionally min-SNR weighted (Hang et al. 2023).
- :class:`VLBLoss`: T * L_{t-1} in bits/dim, an unbiased estimate of the bound minus its constant L_T
  (improved-diffusion's RESCALED_KL); gradients reach mean and variance.
- :class:`HybridLoss`: L_simple + lambda T * L_{t-1}, lambda = 0.001, the mean stop-gradiented inside the vlb term
  (Nichol & Dhariwal 2021, section 3.1); T * 0.001 is improved-diffusion's ``num_timesteps / 1000`` factor on its
  bits/dim vb term, so the variance's weight relative to the MSE is theirs.

:func:`objective_for` builds the one a diffusion's ``loss`` / ``loss_weighting`` / ``min_snr_gamma`` settings name
(the config keys every checkpoint records, so checkpoints from before this module train on identically).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser, Prediction
from diffusion_lab.diffusion.gaussian import HYBRID_LAMBDA, LEARNED_SIMPLE_MESSAGE, GaussianDiffusion, LossWeighting
from diffusion_lab.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base: draws (t, eps), evaluates the denoiser once, and leaves the per-example loss to :meth:`per_example`."""

    def __call__(self, denoiser: Denoiser, x0: Tensor, cond: Condition | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        d = denoiser.diffusion
        t = torch.randint(0, d.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = d.q_sample(x0, t, noise)
        prediction = denoiser(x_t, t, cond)
        return self.per_example(denoiser, prediction, x0, x_t, t, noise), t

    def per_example(self, denoiser: Denoiser, prediction: Prediction, x0: Tensor, x_t: Tensor, t: Tensor,
                    noise: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Refuse, before training, a diffusion this objective cannot train (checked when training starts)."""


@dataclasses.dataclass(frozen=True)
class SimpleLoss(Objective):
    """L_simple on the net's own target; ``weighting="min_snr"``: min(SNR, gamma) expressed for that target."""

    weighting: LossWeighting = "none"
    min_snr_gamma: float = 5.0

    def per_example(self, denoiser: Denoiser, prediction: Prediction, x0: Tensor, x_t: Tensor, t: Tensor,
                    noise: Tensor) -> Tensor:
        if prediction.v is not None:
            raise ConfigError(LEARNED_SIMPLE_MESSAGE)
        return self.mse(denoiser, prediction, x0, t, noise)

    def check(self, diffusion: GaussianDiffusion) -> None:
        if diffusion.learned_variance:
            raise ConfigError(LEARNED_SIMPLE_MESSAGE)

    def mse(self, denoiser: Denoiser, prediction: Prediction, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        target = denoiser.target(x0, t, noise)
        per_example = F.mse_loss(prediction.mean_output.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_example * self.weight(denoiser.diffusion, t)

    def weight(self, diffusion: GaussianDiffusion, t: Tensor) -> Tensor:
        """Per-example weight. ``min_snr``: Hang et al. 2023, min(SNR, gamma) expressed for each target."""
        if self.weighting == "none":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = diffusion.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if diffusion.prediction_type == "eps":
            weight = clipped / snr.clamp(min=1e-20)
        elif diffusion.prediction_type == "x0":
            weight = clipped
        else:
            weight = clipped / (snr + 1)
        return weight.float()


@dataclasses.dataclass(frozen=True)
class VLBLoss(Objective):
    """T * L_{t-1} (bits/dim) through the mean and the learned variance."""

    def per_example(self, denoiser: Denoiser, prediction: Prediction, x0: Tensor, x_t: Tensor, t: Tensor,
                    noise: Tensor) -> Tensor:
        d = denoiser.diffusion
        return d.num_timesteps * d.vb_terms(_float(prediction), x0, x_t, t)


@dataclasses.dataclass(frozen=True)
class HybridLoss(SimpleLoss):
    """L_simple + lambda T * L_{t-1} with the mean stop-gradiented in the vlb term: only the variance learns from
    it (needs a learned variance)."""

    vlb_weight: float = HYBRID_LAMBDA

    def check(self, diffusion: GaussianDiffusion) -> None:
        if not diffusion.learned_variance:
            raise ConfigError("objective=hybrid trains the variance through L_vlb, so it needs "
                              "diffusion.variance=learned_range; use objective=simple for a fixed variance")

    def per_example(self, denoiser: Denoiser, prediction: Prediction, x0: Tensor, x_t: Tensor, t: Tensor,
                    noise: Tensor) -> Tensor:
        if prediction.v is None:
            raise ConfigError("diffusion.loss=hybrid needs diffusion.variance=learned_range")
        d = denoiser.diffusion
        frozen = Prediction(x0=prediction.x0.detach().float(), eps=prediction.eps.detach().float(),
                            mean_output=prediction.mean_output.detach().float(), v=prediction.v.float())
        vlb = d.num_timesteps * d.vb_terms(frozen, x0, x_t, t)
        return self.mse(denoiser, prediction, x0, t, noise) + self.vlb_weight * vlb


def _float(prediction: Prediction) -> Prediction:
    return Prediction(x0=prediction.x0.float(), eps=prediction.eps.float(), mean_output=prediction.mean_output.float(),
                      v=None if prediction.v is None else prediction.v.float())


def objective_for(diffusion: GaussianDiffusion) -> Objective:
    """The objective a diffusion's recorded settings name (``diffusion.loss``, ``loss_weighting``, ``min_snr_gamma``)."""
    if diffusion.loss_type == "vlb":
        return VLBLoss()
    kind = HybridLoss if diffusion.loss_type == "hybrid" else SimpleLoss
    return kind(weighting=diffusion.loss_weighting, min_snr_gamma=diffusion.min_snr_gamma)
