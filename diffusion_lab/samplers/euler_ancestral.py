"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``, Crowson 2022; the ancestral split of
Karras et al. 2022, §3) on the discrete-time DDPM model."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.base import NoiseFn, Sampler
from diffusion_lab.samplers.timesteps import Spacing


@dataclasses.dataclass(frozen=True)
class EulerAncestralSampler(Sampler):
    """An Euler step of the probability-flow ODE down to sigma_down, then fresh noise of std sigma_up.

    Symbols: sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t), the EDM state x^ve = x_t / sqrt(alpha-bar_t) and
    d = (x^ve - x0) / sigma_t = eps. From sigma to the next visited sigma' (0 after the last):
    sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)), sigma_down = sqrt(sigma'^2 - sigma_up^2),
    x^ve' = x^ve + (sigma_down - sigma) d + sigma_up z. One noise draw per step except the last (sigma' = 0).
    ``eta`` = 1 is k-diffusion's and diffusers' EulerAncestralDiscreteScheduler; ``eta`` = 0 is DDIM.
    ``clip_denoised`` clips x0 to [-1, 1] and steps with the eps of the clipped x0.
    """

    num_steps: int | None = 50
    spacing: Spacing = "trailing"  # visits t = T - 1, as diffusers' Euler schedulers are used
    clip_denoised: bool = False
    eta: float = 1.0
    name = "euler_ancestral"
    title = "Euler ancestral"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not 0 <= self.eta <= 1:
            raise ConfigError(f"eta={self.eta!r}: eta must be between 0 (deterministic Euler = DDIM) and 1 "
                              "(ancestral, the default)")

    def step(self, denoiser: Denoiser, x: Tensor, t: int, t_prev: int, noise: NoiseFn,
             cond: Condition | None = None) -> Tensor:
        # 1. alpha-bars and sigmas of this and the next visited step (alpha-bar = 1, sigma = 0 after the last)
        a_t, a_prev = self._alpha_bars(denoiser.diffusion, t, t_prev, x)
        sigma, sigma_next = ((1 - a_t) / a_t).sqrt(), ((1 - a_prev) / a_prev).sqrt()
        # 2. the ancestral split of sigma_next into a deterministic and a noise part
        sigma_up = torch.minimum(sigma_next, self.eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt())
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        # 3. Euler step in the EDM state to sigma_down; d = eps
        d = denoiser(x, self._t(x, t), cond, clip_x0=self.clip_denoised).eps
        x_ve = x / a_t.sqrt() + (sigma_down - sigma) * d
        # 4. fresh noise of std sigma_up (none on the last step), back to the VP state at t_prev
        if t_prev >= 0 and self.eta > 0:
            x_ve = x_ve + sigma_up * noise()
        return x_ve * a_prev.sqrt()
