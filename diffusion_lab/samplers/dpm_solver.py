"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2) on the discrete-time DDPM model.

:func:`log_snr_schedule` holds the symbols the whole DPM-Solver family (2M here, 3M in ``dpm_solver_3m``, the SDE
variant in ``sde_dpm_solver``) shares: alpha_t, sigma_t and lambda_t of every training timestep.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.samplers.base import NoiseFn, Sampler
from diffusion_lab.samplers.timesteps import Spacing


def log_snr_schedule(diffusion: GaussianDiffusion, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha, sigma, lambda) of every training timestep t: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 -
    alpha-bar_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR), each a length-T tensor of ``dtype``."""
    ac = diffusion.alphas_cumprod.to(dtype)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


@dataclasses.dataclass(frozen=True)
class DPMSolverSampler(Sampler):
    """Second-order multistep solver of the diffusion ODE in data-prediction form.

    Symbols: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t), lambda_t = log(alpha_t / sigma_t),
    h_i = lambda_{t_i} - lambda_{t_{i-1}}. With D_i the model's x_0 prediction at t_i:
    first order  x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_{i-1};
    second order replaces D_{i-1} by (1 + 1/(2 r)) D_{i-1} - 1/(2 r) D_{i-2}, r = h_{i-1} / h_i.
    The last step goes to sigma = 0 and is first order (it returns the final x_0 prediction), as in diffusers.
    The default ``logsnr`` spacing (steps uniform in lambda from t = T - 1 to t = 0) is the one the step size h
    is measured in; on Gaussian data it reaches at 10 NFE the accuracy DDIM has at 100 (tests/unit).
    """

    num_steps: int | None = 20
    spacing: Spacing = "logsnr"
    clip_denoised: bool = False  # the ODE solver as published; True clips each x0 prediction to [-1, 1]
    name = "dpm_solver"
    title = "DPM-Solver++(2M)"

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
                return x0  # 4. sigma_next = 0: the update reduces to x = D_i (first order)
            s = steps[i + 1]
            # 2. step size in log-SNR
            h = lam[s] - lam[t]
            # 3. first-order (DDIM-equivalent) or second-order multistep update
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = self.update(x, d, h, alpha[s], sigma[s], sigma[t], noise)
            x0_prev, h_prev = x0, h
        return x

    def update(self, x: Tensor, d: Tensor, h: Tensor, alpha_s: Tensor, sigma_s: Tensor, sigma_t: Tensor,
               noise: NoiseFn) -> Tensor:
        """The step from t to s given the multistep estimate d of x0: the ODE's x_s = (sigma_s / sigma_t) x_t -
        alpha_s (e^{-h} - 1) d. The SDE variant (sde_dpm_solver.py) overrides only this."""
        return (sigma_s / sigma_t) * x - alpha_s * torch.expm1(-h) * d
