"""What every sampler shares: its config, the timestep list, the loop and the progress bar."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.samplers.timesteps import timesteps

NetFn = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class: a frozen dataclass whose fields are the sampler's whole config. Stateless between calls."""

    num_steps: int = 1000
    spacing: str = "uniform"
    clip_denoised: bool = True
    progress: bool = False

    name = "base"

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}}

    def visited(self, diffusion: GaussianDiffusion) -> list[int]:
        return timesteps(diffusion.num_timesteps, self.num_steps, self.spacing)

    @torch.no_grad()
    def sample(
        self,
        net: NetFn,
        diffusion: GaussianDiffusion,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Draw ``shape`` samples in [-1, 1] (clipped only if ``clip_denoised``) starting from x_T ~ N(0, I)."""
        device = torch.device(device) if device is not None else diffusion.betas.device
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
        steps = self.visited(diffusion)
        prevs = steps[1:] + [-1]
        pairs = list(zip(steps, prevs))
        if self.progress:
            from rich.progress import track

            pairs = track(pairs, description=f"{self.name} sampling", transient=True)
        for t, t_prev in pairs:
            x = self.step(net, diffusion, x, t, t_prev, generator)
        return x

    def step(
        self, net: NetFn, diffusion: GaussianDiffusion, x: Tensor, t: int, t_prev: int, generator: torch.Generator | None
    ) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _alpha_bars(diffusion: GaussianDiffusion, t: int, t_prev: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha-bar at t and at the previous visited step (1 past the end: x_{-1} is the clean image)."""
        a_t = diffusion.alphas_cumprod[t]
        a_prev = diffusion.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
        return a_t.to(like.dtype), a_prev.to(like.dtype)
