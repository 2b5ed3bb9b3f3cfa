"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), also on a strided subsequence of timesteps."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.diffusion.gaussian import VARIANCES, GaussianDiffusion, Variance
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.base import NoiseFn, Sampler


@dataclasses.dataclass(frozen=True)
class DDPMSampler(Sampler):
    """Ancestral sampling with sigma_t^2 = beta_t ("fixed_large"), beta-tilde_t ("fixed_small"), or the learned
    interpolation between them ("learned_range", Improved DDPM eq. 15; needs a 2C-channel learned-variance model).
    A fixed variance on a learned-variance model uses only its mean part.

    With fewer steps than T, the betas are respaced over the visited timesteps tau (improved-diffusion's
    ``space_timesteps``): beta'_i = 1 - alpha-bar_{tau_i} / alpha-bar_{tau_{i-1}}; with "fixed_large" this is
    the sigma-hat row of DDIM's Table 1. "learned_range" interpolates between the respaced log beta'_t and
    log beta-tilde'_t = log(beta'_t (1 - alpha-bar_{tau_{i-1}}) / (1 - alpha-bar_{tau_i})), as improved-diffusion's
    ``respace.py`` does (and diffusers' DDPMScheduler with variance_type="learned_range").
    """

    variance: Variance = "fixed_large"
    name = "ddpm"
    title_fields = ("variance",)

    def _title(self) -> str:
        return {"fixed_large": "DDPM fixed_large (sigma-hat)"}.get(self.variance, f"DDPM {self.variance}")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variance not in VARIANCES:
            raise ConfigError(f"variance={self.variance!r} is not allowed; allowed values: {', '.join(VARIANCES)}")

    def check(self, diffusion: GaussianDiffusion) -> None:
        super().check(diffusion)
        if self.variance == "learned_range" and diffusion.variance != "learned_range":
            raise ConfigError(self._fixed_model_message(diffusion))

    @staticmethod
    def _fixed_model_message(diffusion: GaussianDiffusion) -> str:
        return ("variance=learned_range needs a learned-variance model (diffusion.variance=learned_range, "
                f"2C output channels); this one has a fixed variance: use variance={diffusion.variance}")

    def step(self, denoiser: Denoiser, x: Tensor, t: int, t_prev: int, noise: NoiseFn,
             cond: Condition | None = None) -> Tensor:
        diffusion, t_batch = denoiser.diffusion, self._t(x, t)
        # 1. alpha-bars of this and the previous visited step, and the respaced beta'_t
        a_t, a_prev = self._alpha_bars(diffusion, t, t_prev, x)
        beta = 1 - a_t / a_prev
        # 2. predicted x_0 from the network output (eq. 15), optionally clipped
        prediction = denoiser(x, t_batch, cond, clip_x0=self.clip_denoised)
        x0 = prediction.x0
        # 3. posterior mean mu-tilde(x_t, x_0) (eq. 7)
        mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
        if t_prev < 0:
            return mean  # the last step adds no noise
        # 4. x_{t-1} = mu + sigma_t z (Algorithm 2, line 4)
        beta_tilde = beta * (1 - a_prev) / (1 - a_t)
        if self.variance == "fixed_large":
            return mean + beta.sqrt() * noise()
        if self.variance == "fixed_small":
            return mean + beta_tilde.sqrt() * noise()
        if prediction.v is None:
            raise ConfigError(self._fixed_model_message(diffusion))
        log_var = prediction.log_variance(beta.log(), beta_tilde.log())
        return mean + torch.exp(0.5 * log_var) * noise()
