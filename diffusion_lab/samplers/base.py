"""What every sampler shares: its config, the timestep list, the loop, noise and the progress bar."""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Condition, Denoiser, as_denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.noise import Noise
from diffusion_lab.samplers.timesteps import SPACINGS, Spacing, timesteps

NoiseFn = Callable[[], Tensor]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class: a frozen dataclass whose fields are the sampler's whole config. Stateless between calls.

    Subclasses implement :meth:`step` (one move from ``t`` to the previous visited timestep ``t_prev``,
    -1 after the last) or override :meth:`run` when a step needs more than the current state. Both read the
    network only as ``denoiser(x, t, cond, clip_x0=...) -> Prediction`` (x0, eps, and v of a learned variance).

    A bad field fails in the constructor (:class:`ConfigError`); what depends on the model (num_steps <= T, a
    learned variance) fails in :meth:`check`, which every command calls at start-up for every sampler it will use.
    A subclass with its own ``__post_init__`` calls ``super().__post_init__()``.
    """

    num_steps: int | None = None  # None: every one of the T training timesteps
    spacing: Spacing = "uniform"
    clip_denoised: bool = True
    progress: bool = False

    name = "base"
    title = ""  # how reports name it ("DDIM"); empty: the name
    label_fields: ClassVar[tuple[str, ...]] = ()  # fields every label shows, default or not (DDIM's eta)
    title_fields: ClassVar[tuple[str, ...]] = ()  # fields a subclass's _title() already shows

    def __post_init__(self) -> None:
        steps = self.num_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"num_steps={steps!r}: use a whole number of steps >= 1 (e.g. num_steps=50), "
                              "or null for all T timesteps")
        if self.spacing not in SPACINGS:
            raise ConfigError(f"spacing={self.spacing!r} is not allowed; allowed values: {', '.join(SPACINGS)}")

    def check(self, diffusion: GaussianDiffusion) -> None:
        """Raise :class:`ConfigError` when this sampler cannot sample a model of ``diffusion`` (before any work)."""
        self.visited(diffusion)

    def config(self) -> dict:
        """The record logged with every result: the name and every field but the progress switch."""
        return {"name": self.name, **{k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}}

    def label(self) -> str:
        """The row name in reports and plots: the title, the ``label_fields``, then every other field (but
        num_steps and progress) that differs from the class default, so two different configs never share a label.
        """
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        shown = [f"{k}={_show(getattr(self, k))}" for k in self.label_fields]
        other = [f"{k}={_show(v)}" for k, v in dataclasses.asdict(self).items()
                 if k not in ("num_steps", "progress", *self.label_fields, *self.title_fields) and v != defaults[k]]
        head = " ".join([self._title(), *shown[:1]])
        return ", ".join([head, *shown[1:], *other])  # "DDIM eta=0", "DDIM eta=1, spacing=quadratic"

    def _title(self) -> str:
        return self.title or self.name

    def visited(self, diffusion: GaussianDiffusion) -> list[int]:
        """The timesteps this sampler evaluates the network at, in order; its length is the NFE."""
        T = diffusion.num_timesteps
        return timesteps(T, T if self.num_steps is None else self.num_steps, self.spacing, diffusion.alphas_cumprod)

    @torch.no_grad()
    def sample(
        self,
        net: nn.Module | Denoiser,
        diffusion: GaussianDiffusion | None,
        shape: Sequence[int],
        *,
        cond: Condition | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        indices: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Draw ``shape`` samples, starting from x_T ~ N(0, I) (or the given ``x_T``).

        ``net`` is a :class:`~diffusion_lab.diffusion.denoiser.Denoiser` (``diffusion`` may then be None) or a plain
        net, which is wrapped in one with ``diffusion``: samplers read the network only through the denoiser.
        ``cond`` (class labels, one per image, and a guidance scale) goes to every network evaluation.
        Randomness comes from ``generator`` (or a list of them, one per image), or with ``seed`` from per-image
        generators seeded by (seed, indices[k]) so that image k is the same in any batch (indices default to 0..B-1).
        """
        denoiser = as_denoiser(net, diffusion)
        device = torch.device(device) if device is not None else denoiser.diffusion.betas.device
        noise = Noise(shape, device, generator=generator, seed=seed, indices=indices)
        x = noise() if x_T is None else x_T.to(device)
        return self.run(denoiser, x, noise, cond=cond.to(device) if cond is not None else None)

    def run(self, denoiser: Denoiser, x: Tensor, noise: NoiseFn, cond: Condition | None = None) -> Tensor:
        steps = self.visited(denoiser.diffusion)
        for t, t_prev in self._progress(list(zip(steps, steps[1:] + [-1]))):
            x = self.step(denoiser, x, t, t_prev, noise, cond)
        return x

    def step(self, denoiser: Denoiser, x: Tensor, t: int, t_prev: int, noise: NoiseFn,
             cond: Condition | None = None) -> Tensor:
        raise NotImplementedError

    def _progress(self, items: list) -> list:
        if not self.progress:
            return items
        from rich.progress import track

        return track(items, description=f"{self.name} ({len(items)} steps)", transient=True)  # type: ignore[return-value]

    @staticmethod
    def _alpha_bars(diffusion: GaussianDiffusion, t: int, t_prev: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha-bar at t and at the previous visited step (1 past the end: x_{-1} is the clean image)."""
        a_t = diffusion.alphas_cumprod[t]
        a_prev = diffusion.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(a_t)
        return a_t.to(like.dtype), a_prev.to(like.dtype)

    @staticmethod
    def _t(x: Tensor, t: int) -> Tensor:
        return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _show(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
