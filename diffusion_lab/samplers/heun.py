"""Heun's second-order sampler (Karras et al. 2022, "Elucidating the Design Space...", EDM Algorithm 1,
deterministic: S_churn = 0) on the discrete-time DDPM model."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.samplers.base import NoiseFn, Sampler
from diffusion_lab.samplers.timesteps import Spacing


@dataclasses.dataclass(frozen=True)
class HeunSampler(Sampler):
    """The probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma = eps, solved by Heun's method in sigma.

    Symbols: sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) and the EDM (variance-exploding) state
    x^ve = x_t / sqrt(alpha-bar_t), so that x^ve = x_0 + sigma_t eps. A step from the visited t_i to t_{i+1}:
    d_i = eps(x_i, t_i), the Euler guess x' = x^ve_i + (sigma_{i+1} - sigma_i) d_i, then (Algorithm 1, lines 7-8)
    d' = eps(x', t_{i+1}) and x^ve_{i+1} = x^ve_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2. The last step goes
    to sigma = 0 and is Euler (line 6), so ``num_steps`` Heun steps cost 2 num_steps - 1 network evaluations;
    :meth:`visited` lists them (t_0, t_1, t_1, t_2, t_2, ..., as diffusers' HeunDiscreteScheduler).
    ``clip_denoised`` clips each x0 prediction to [-1, 1] and steps with the eps of the clipped x0.
    EDM uses its rho = 7 "karras" sigmas; the default here is ``trailing`` (it visits t = T - 1).
    """

    num_steps: int | None = 10
    spacing: Spacing = "trailing"
    clip_denoised: bool = False  # the ODE solver as published
    name = "heun"
    title = "Heun (EDM)"

    def visited(self, diffusion: GaussianDiffusion) -> list[int]:
        steps = super().visited(diffusion)
        return steps[:1] + [t for t in steps[1:] for _ in range(2)]

    def run(self, denoiser: Denoiser, x: Tensor, noise: NoiseFn, cond: Condition | None = None) -> Tensor:
        steps = super().visited(denoiser.diffusion)
        ac = denoiser.diffusion.alphas_cumprod.to(x.dtype)
        sigmas = ((1 - ac) / ac).sqrt()

        def eps(x_ve: Tensor, t: int) -> Tensor:  # the network reads the VP state x_t = sqrt(alpha-bar_t) x^ve
            return denoiser(x_ve * ac[t].sqrt(), self._t(x_ve, t), cond, clip_x0=self.clip_denoised).eps

        # 1. to the EDM state at the first visited timestep
        x = x / ac[steps[0]].sqrt()
        for t, t_next in self._progress(list(zip(steps, steps[1:] + [-1]))):
            sigma, sigma_next = sigmas[t], (sigmas[t_next] if t_next >= 0 else torch.zeros_like(sigmas[t]))
            # 2. Euler step (Algorithm 1, lines 4-5)
            d = eps(x, t)
            x_next = x + (sigma_next - sigma) * d
            # 3. second-order correction unless sigma_next = 0 (lines 6-8)
            if t_next >= 0:
                x_next = x + (sigma_next - sigma) * (d + eps(x_next, t_next)) / 2
            x = x_next
        # 4. sigma = 0: the EDM state is the clean image
        return x
