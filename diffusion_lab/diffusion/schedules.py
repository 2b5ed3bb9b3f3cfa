"""Beta schedules as pure functions of the number of diffusion steps.

Every schedule returns a float64 tensor ``betas`` of shape ``(T,)``; the diffusion object turns it into
registered buffers. Formulas follow the code bases that introduced them:

- ``linear``, ``quadratic``, ``sigmoid``: Ho et al. 2020, ``diffusion_utils_2.get_beta_schedule``.
- ``cosine``: Nichol & Dhariwal 2021, eq. 17, with betas clipped at ``max_beta`` = 0.999.
- :func:`rescale_zero_terminal_snr`: Lin et al. 2023, Algorithm 1.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from diffusion_lab.errors import ConfigError

Schedule = Literal["linear", "cosine", "quadratic", "sigmoid"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s schedule: betas evenly spaced from ``beta_start`` to ``beta_end``."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def quadratic_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Square roots of the betas evenly spaced (Ho et al.'s ``quad``)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """A sigmoid over [-6, 6] rescaled to [beta_start, beta_end] (Ho et al.'s ``sigmoid``)."""
    x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2).

    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at ``max_beta`` to avoid the singularity at t = T.
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0 (zero terminal SNR)
    while alpha_bar_0 is unchanged. The last beta becomes exactly 1."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    schedule: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """The betas of a named schedule, optionally rescaled to zero terminal SNR."""
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ConfigError(f"diffusion.num_timesteps={num_timesteps!r}: the process needs a whole number of steps >= 1 "
                          "(1000 in DDPM)")
    if schedule == "linear":
        betas = linear_betas(num_timesteps, beta_start, beta_end)
    elif schedule == "quadratic":
        betas = quadratic_betas(num_timesteps, beta_start, beta_end)
    elif schedule == "sigmoid":
        betas = sigmoid_betas(num_timesteps, beta_start, beta_end)
    elif schedule == "cosine":
        betas = cosine_betas(num_timesteps, cosine_s, max_beta)
    else:
        raise ConfigError(f"diffusion.schedule={schedule!r} is not allowed; allowed values: {', '.join(SCHEDULES)}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    if not (betas > 0).all() or not (betas <= 1).all():
        raise ConfigError(f"diffusion.schedule={schedule!r} with beta_start={beta_start}, beta_end={beta_end} gives "
                          "betas outside (0, 1]; use 0 < beta_start <= beta_end <= 1 (DDPM: 1e-4 and 0.02)")
    return betas
