"""DDIM sampling (Song, Meng, Ermon 2021, eq. 12)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.samplers.base import NetFn, Sampler


@dataclasses.dataclass(frozen=True)
class DDIMSampler(Sampler):
    """Generalised (non-Markovian) sampling; ``eta`` = 0 is deterministic DDIM, 1 matches DDPM's beta-tilde."""

    num_steps: int = 50
    eta: float = 0.0
    use_clipped_model_output: bool = False
    name = "ddim"

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"sampler.eta must be >= 0, got {self.eta}")

    def step(
        self, net: NetFn, diffusion: GaussianDiffusion, x: Tensor, t: int, t_prev: int, generator: torch.Generator | None
    ) -> Tensor:
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        # 1. alpha-bars of this and the previous visited step (alpha-bar = 1 after the last step)
        a_t, a_prev = self._alpha_bars(diffusion, t, t_prev, x)
        # 2. predicted x_0 ("predicted x_0" term of eq. 12), optionally clipped
        x0, eps = diffusion.predict_x0_eps(net(x, t_batch), x, t_batch, clip_x0=False)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
            if self.use_clipped_model_output:
                eps = diffusion.eps_from_x0(x, t_batch, x0)
        # 3. sigma_t(eta) (eq. 16)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # 4. "direction pointing to x_t" and the update of eq. 12
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x_prev
