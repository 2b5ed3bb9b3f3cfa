"""SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++"): the second-order multistep solver of the reverse SDE."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.samplers.base import NoiseFn, Sampler
from diffusion_lab.samplers.dpm_solver import log_snr_schedule
from diffusion_lab.samplers.timesteps import Spacing


@dataclasses.dataclass(frozen=True)
class SDEDPMSolverSampler(Sampler):
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

    def run(self, denoiser: Denoiser, x: Tensor, noise: NoiseFn, cond: Condition | None = None) -> Tensor:
        diffusion = denoiser.diffusion
        steps = self.visited(diffusion)
        alpha, sigma, lam = log_snr_schedule(diffusion, x.dtype)
        x0_prev: Tensor | None = None
        h_prev: Tensor | None = None
        for i in self._progress(list(range(len(steps)))):
            t = steps[i]
            # 1. data prediction D_i at the current timestep
            x0 = denoiser(x, self._t(x, t), cond, clip_x0=self.clip_denoised).x0
            if i == len(steps) - 1:
                return x0  # 5. sigma_next = 0: x = D_i, the noise term's sigma_next sqrt(1 - e^{-2h}) is 0
            s = steps[i + 1]
            # 2. step size in log-SNR
            h = lam[s] - lam[t]
            # 3. first-order or second-order (midpoint) multistep estimate of D
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            # 4. the SDE update: decay of x, the data term, and fresh noise of variance sigma_s^2 (1 - e^{-2h})
            decay = -torch.expm1(-2 * h)
            x = (sigma[s] / sigma[t]) * torch.exp(-h) * x + alpha[s] * decay * d + sigma[s] * decay.sqrt() * noise()
            x0_prev, h_prev = x0, h
        return x
