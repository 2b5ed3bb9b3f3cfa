"""SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): the second-order multistep solver of the reverse SDE."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.samplers.base import NoiseFn
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler
from diffusion_lab.samplers.timesteps import Spacing


@dataclasses.dataclass(frozen=True)
class SDEDPMSolverSampler(DPMSolverSampler):
    """Second-order multistep solver of the diffusion SDE in data-prediction form (stochastic DPM-Solver++(2M)).

    Symbols as in :class:`~diffusion_lab.samplers.dpm_solver.DPMSolverSampler`: alpha_t, sigma_t, lambda_t =
    log(alpha_t / sigma_t), h_i = lambda_{t_i} - lambda_{t_{i-1}}, D_i the x_0 prediction at t_i. With z_i ~ N(0, I):
    first order  x_i = (sigma_i / sigma_{i-1}) e^{-h_i} x_{i-1} + alpha_i (1 - e^{-2 h_i}) D_{i-1}
                       + sigma_i sqrt(1 - e^{-2 h_i}) z_i;
    second order replaces D_{i-1} by (1 + 1/(2 r)) D_{i-1} - 1/(2 r) D_{i-2}, r = h_{i-1} / h_i (the "midpoint"
    form, diffusers' and k-diffusion's default). The last step goes to sigma = 0, where the noise term vanishes
    and the update reduces to x = D (first order, no noise drawn), as in DPMSolverSampler.
    Each other step draws one ``noise()``; the first step is first order (no earlier prediction yet).
    """

    num_steps: int | None = 20
    spacing: Spacing = "logsnr"
    clip_denoised: bool = False  # the solver as published; True clips each x0 prediction to [-1, 1]
    name = "sde_dpm_solver"
    title = "SDE-DPM-Solver++(2M)"

    def update(self, x: Tensor, d: Tensor, h: Tensor, alpha_s: Tensor, sigma_s: Tensor, sigma_t: Tensor,
               noise: NoiseFn) -> Tensor:
        """The SDE update: decay of x, the data term, and fresh noise of variance sigma_s^2 (1 - e^{-2h}). The loop,
        the multistep estimate d and the last step (to sigma = 0: x = D, no noise) are DPMSolverSampler's."""
        decay = -torch.expm1(-2 * h)
        return (sigma_s / sigma_t) * torch.exp(-h) * x + alpha_s * decay * d + sigma_s * decay.sqrt() * noise()
