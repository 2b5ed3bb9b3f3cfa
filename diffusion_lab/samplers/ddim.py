"""DDIM sampling (Song, Meng, Ermon 2021, eq. 12), its deterministic inversion and latent interpolation (§5)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Condition, Denoiser, as_denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.base import NoiseFn, Sampler


@dataclasses.dataclass(frozen=True)
class DDIMSampler(Sampler):
    """Generalised (non-Markovian) sampling; ``eta`` = 0 is deterministic DDIM, 1 matches DDPM's beta-tilde.

    ``use_clipped_model_output``: after clipping x_0, recompute eps from the clipped x_0 (diffusers' option).
    """

    num_steps: int | None = 50
    # No x0 clipping by default, as the DDIM paper's code and conf/sampler/ddim.yaml (see there for why).
    clip_denoised: bool = False
    eta: float = 0.0
    use_clipped_model_output: bool = False
    name = "ddim"
    title = "DDIM"
    label_fields = ("eta",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eta >= 0:  # also NaN
            raise ConfigError(f"eta={self.eta}: eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise)")

    def step(self, denoiser: Denoiser, x: Tensor, t: int, t_prev: int, noise: NoiseFn,
             cond: Condition | None = None) -> Tensor:
        diffusion, t_batch = denoiser.diffusion, self._t(x, t)
        # 1. alpha-bars of this and the previous visited step (alpha-bar = 1 after the last step)
        a_t, a_prev = self._alpha_bars(diffusion, t, t_prev, x)
        # 2. "predicted x_0" of eq. 12 from the network output, optionally clipped
        prediction = denoiser(x, t_batch, cond)
        x0, eps = prediction.x0, prediction.eps
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
            if self.use_clipped_model_output:
                eps = diffusion.eps_from_x0(x, t_batch, x0)
        # 3. sigma_t(eta) (eq. 16)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # 4. x_{t-1} = sqrt(a_prev) x0 + "direction pointing to x_t" + sigma z  (eq. 12)
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * noise()
        return x_prev

    @torch.no_grad()
    def invert(self, net: nn.Module | Denoiser, diffusion: GaussianDiffusion | None, x0: Tensor,
               cond: Condition | None = None) -> Tensor:
        """x_0 -> x_T along the deterministic DDIM ODE (eta = 0), visiting this sampler's timesteps upwards.

        Each step reuses eq. 12 with the roles of t and t_prev swapped, evaluating eps at the lower timestep
        (the DDIM paper's §5.4 encoding; for the first step, at the smallest visited timestep).
        """
        denoiser = as_denoiser(net, diffusion)
        steps = self.visited(denoiser.diffusion)[::-1]  # ascending
        x = x0
        for t_from, t_to in self._progress(list(zip([-1] + steps[:-1], steps))):
            t_eval = self._t(x, max(t_from, steps[0]))
            a_to, a_from = self._alpha_bars(denoiser.diffusion, t_to, t_from, x)
            eps = denoiser(x, t_eval, cond).eps
            x0_hat = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
            x = a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps
        return x


def slerp(z0: Tensor, z1: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation between two Gaussian latents (DDIM §5.3): keeps their norm typical of N(0, I)."""
    a, b = z0.flatten(1), z1.flatten(1)
    theta = torch.arccos((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(min=1e-7)
    theta = theta.view(-1, *([1] * (z0.ndim - 1)))
    alpha = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)
