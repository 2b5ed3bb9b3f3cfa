"""DPM-Solver++(3M) (Lu et al. 2022, "DPM-Solver++", the multistep third-order solver in data-prediction form)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.samplers.base import NoiseFn, Sampler
from diffusion_lab.samplers.dpm_solver import log_snr_schedule
from diffusion_lab.samplers.timesteps import Spacing


@dataclasses.dataclass(frozen=True)
class DPMSolver3MSampler(Sampler):
    """Third-order multistep solver of the diffusion ODE, reusing the last three x_0 predictions.

    Symbols as in :class:`~diffusion_lab.samplers.dpm_solver.DPMSolverSampler`: alpha_t, sigma_t, lambda_t =
    log(alpha_t / sigma_t), D_i the x_0 prediction at t_i; the step from s = t_{i-1} to t = t_i has h = lambda_t -
    lambda_s, and the two before it h_0, h_1, with r_0 = h_0 / h, r_1 = h_1 / h. From the divided differences
    D1_0 = (D_{i-1} - D_{i-2}) / r_0 and D1_1 = (D_{i-2} - D_{i-3}) / r_1:
    D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r_0 + r_1), and
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_{i-1} + alpha_t ((e^{-h} - 1) / h + 1) D1
          - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2.
    The first step is first order (DDIM) and the second second order (too few predictions yet), in the midpoint
    form x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D_{i-1} + D1_0 / 2) of DPM-Solver++(2M). The last
    step goes to sigma = 0 and returns the final x_0 prediction. With ``lower_order_final`` and fewer than 15
    visited timesteps the second-to-last step is second order too, which steadies few-step sampling (diffusers').
    """

    num_steps: int | None = 20
    spacing: Spacing = "logsnr"
    clip_denoised: bool = False  # the ODE solver as published; True clips each x0 prediction to [-1, 1]
    lower_order_final: bool = True  # below 15 steps the second-to-last step is second order (as in diffusers)
    name = "dpm_solver_3m"
    title = "DPM-Solver++(3M)"

    def run(self, denoiser: Denoiser, x: Tensor, noise: NoiseFn, cond: Condition | None = None) -> Tensor:
        diffusion = denoiser.diffusion
        steps = self.visited(diffusion)
        alpha, sigma, lam = log_snr_schedule(diffusion, x.dtype)
        x0s: list[Tensor] = []  # the latest x_0 predictions, newest last (at most three)
        hs: list[Tensor] = []  # the step sizes of the steps taken, newest last (at most two)
        for i in self._progress(list(range(len(steps)))):
            t = steps[i]
            # 1. data prediction D_i at the current timestep
            x0s = (x0s + [denoiser(x, self._t(x, t), cond, clip_x0=self.clip_denoised).x0])[-3:]
            if i == len(steps) - 1:
                return x0s[-1]  # 5. sigma_next = 0: the update reduces to x = D_i (first order)
            s = steps[i + 1]
            # 2. step size in log-SNR, and the order this step can take
            h = lam[s] - lam[t]
            order = min(len(x0s), 2 if self.lower_order_final and len(steps) < 15 and i == len(steps) - 2 else 3)
            # 3. the first-order (DDIM) part of the update
            phi1 = torch.expm1(-h)
            x = (sigma[s] / sigma[t]) * x - alpha[s] * phi1 * x0s[-1]
            if order == 2:
                # 4a. second order, the "midpoint" form of DPMSolverSampler (diffusers' default solver_type)
                x = x - 0.5 * alpha[s] * phi1 * (h / hs[-1]) * (x0s[-1] - x0s[-2])
            elif order == 3:
                # 4b. third order: D1 and D2 from the last three predictions
                r0, r1 = hs[-1] / h, hs[-2] / h
                d1_0, d1_1 = (x0s[-1] - x0s[-2]) / r0, (x0s[-2] - x0s[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + alpha[s] * (phi1 / h + 1) * d1 - alpha[s] * ((phi1 + h) / h**2 - 0.5) * d2
            hs = (hs + [h])[-2:]
        return x
