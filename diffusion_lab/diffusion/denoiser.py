"""The one seam between a network and the maths: ``denoiser(x_t, t, cond) -> Prediction``.

:class:`Denoiser` wraps (net, diffusion). It is the only code that calls the network and the only code that knows
the network's output layout (C channels, or 2C with a learned variance: the mean part, then v) and its prediction
type (eps, x0 or v). Samplers, objectives, the variational bound, FID / bits-per-dim feature generation and the
pipelines all read the network through it, so a new sampler, objective or network touches none of the others.

Conditioning: ``cond`` is a :class:`Condition` (class labels and a classifier-free guidance scale, Ho & Salimans
2022). With a guidance scale w != 1 the conditional and the unconditional (null-class) branches run in one batched
forward and the mean part is combined as ``out_u + w (out_c - out_u)``: w = 1 is the conditional model alone (no
second branch, bit for bit), w = 0 the unconditional one, w > 1 guided (diffusers' ``guidance_scale``). The
parameterisations are affine in the output at fixed (x_t, t), so combining the raw output equals combining eps or
x0. A learned variance is taken from the conditional branch (as GLIDE does).

The net contract (:func:`check_net`): ``net(x_t, t)`` for an unconditional net, ``net(x_t, t, class_labels)`` for
one built with ``config.num_classes`` (class ``num_classes`` is the null class), returning
``net_output_channels(C, variance)`` channels at the input's size; ``net.config`` carries ``in_channels``,
``out_channels``, ``image_size`` and ``num_classes`` (None: unconditional).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion, interpolate_log_variance
from diffusion_lab.errors import ConfigError


def net_output_channels(data_channels: int, variance: str) -> int:
    """The channels a net must output for ``data_channels``-channel images: C, or 2C (the mean part, then v) with
    ``variance=learned_range``. The config resolver, the config check and the denoiser all use this one function."""
    return 2 * int(data_channels) if variance == "learned_range" else int(data_channels)


def net_contract(net: nn.Module) -> dict[str, Any]:
    """``{in_channels, out_channels, image_size, num_classes}`` from ``net.config`` (a wrapper passes its net's)."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} has no .config: a net declares in_channels, out_channels, image_size "
                        "and num_classes there (see diffusion_lab.diffusion.denoiser)")
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    return {"in_channels": get("in_channels"), "out_channels": get("out_channels"),
            "image_size": get("image_size"), "num_classes": get("num_classes")}


def check_net(net: nn.Module, diffusion: GaussianDiffusion) -> dict[str, Any]:
    """The contract, checked once: output channels fit the input channels and the diffusion's variance."""
    contract = net_contract(net)
    channels, out = contract["in_channels"], contract["out_channels"]
    if channels is not None and out is not None:
        want = net_output_channels(channels, diffusion.variance)
        if out != want:
            raise ConfigError(f"the net outputs {out} channels for {channels}-channel images, but "
                              f"diffusion.variance={diffusion.variance} needs {want}; {_channels_fix(diffusion, want)}")
    return contract


def _channels_fix(diffusion: GaussianDiffusion, want: int) -> str:
    if diffusion.learned_variance:
        return f"set model.net.out_channels={want} (learned_range: the mean part and v)"
    return f"set model.net.out_channels={want}, or diffusion.variance=learned_range for a 2C-channel net"


def check_guidance_scale(value: Any, error: type[Exception] = ConfigError) -> float:
    """A classifier-free guidance scale as a float >= 0 (1: the conditional model alone, > 1: guided, 0: the
    unconditional model); anything else raises ``error``. Every entry point (Condition, the pipelines, the sample
    and eval commands, the training callbacks) checks with this one function."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise error(f"guidance_scale={value!r}: needs a number >= 0 (1: the conditional model alone, > 1: guided, "
                    "0: unconditional)")
    return float(value)


def uniform_labels(indices: Any, num_classes: int) -> Tensor:
    """The class labels of images drawn for a metric: image i gets class ``i mod num_classes``, so every class is
    drawn equally often (within one) and image i's label depends only on i, as its noise does."""
    return torch.as_tensor(list(indices), dtype=torch.long) % int(num_classes)


@dataclasses.dataclass(frozen=True)
class Condition:
    """What a sample is conditioned on: one class label per image (int64, (B,)) and the guidance scale."""

    class_labels: Tensor
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_scale", check_guidance_scale(self.guidance_scale))

    @classmethod
    def for_indices(cls, net: nn.Module, indices: Any, guidance_scale: float = 1.0) -> "Condition | None":
        """The condition of images ``indices`` for a metric or a preview: uniform labels (:func:`uniform_labels`)
        for a conditional net; None for an unconditional one, which takes no condition (then ``guidance_scale``
        must be 1)."""
        num_classes = net_contract(net)["num_classes"]
        if num_classes is None:
            if check_guidance_scale(guidance_scale) != 1:
                raise ConfigError(f"guidance_scale={guidance_scale:g} needs a class-conditional model; this net is "
                                  "unconditional (model.net.num_classes=null): use guidance_scale 1")
            return None
        return cls(uniform_labels(indices, num_classes), guidance_scale)

    def __getitem__(self, index: slice) -> "Condition":
        return Condition(self.class_labels[index], self.guidance_scale)

    def to(self, device: torch.device | str) -> "Condition":
        return Condition(self.class_labels.to(device), self.guidance_scale)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The network's output at (x_t, t), decoded: x0, eps, the raw mean part in the net's own parameterisation
    (what L_simple compares with its target) and, for a learned variance, v of Improved DDPM eq. 15."""

    x0: Tensor
    eps: Tensor
    mean_output: Tensor
    v: Tensor | None = None

    def log_variance(self, max_log: Tensor, min_log: Tensor) -> Tensor:
        """The learned log Sigma between ``max_log`` (log beta) and ``min_log`` (log beta-tilde), Improved DDPM
        eq. 15; strided samplers pass their respaced betas."""
        if self.v is None:
            raise ConfigError("variance=learned_range needs a learned-variance model (2C output channels)")
        return interpolate_log_variance(self.v, max_log, min_log)


class Denoiser:
    """``denoiser(x_t, t, cond=None, clip_x0=False) -> Prediction`` for (net, diffusion); see the module doc.

    A plain object, not an ``nn.Module``: it owns no weights, so wrapping a module's net adds nothing to any
    state_dict or checkpoint."""

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion) -> None:
        self.net, self.diffusion = net, diffusion
        # the net contract, checked here once for every user of the net (a plain function has no config)
        contract = check_net(net, diffusion) if getattr(net, "config", None) is not None else {}
        self.num_classes: int | None = contract.get("num_classes")

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    def output(self, x_t: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        """The network's raw output (after guidance): the one place the network is called."""
        if cond is None:
            return self._checked(self.net(x_t, t), x_t)
        if not self.conditional:
            raise ConfigError("class_labels were given, but this model is unconditional (trained without "
                              "data labels: model.net.num_classes=null); sample without class_labels")
        labels = cond.class_labels.to(device=x_t.device, dtype=torch.long)
        if labels.shape != (x_t.shape[0],):
            raise ValueError(f"class_labels of shape {tuple(labels.shape)} for a batch of {x_t.shape[0]} images")
        if cond.guidance_scale == 1:
            return self._checked(self.net(x_t, t, labels), x_t)
        null = torch.full_like(labels, self.num_classes)
        both = self._checked(self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null])),
                             torch.cat([x_t, x_t]))
        out_c, out_u = both.chunk(2)
        channels = x_t.shape[1]
        mean = out_u[:, :channels] + cond.guidance_scale * (out_c[:, :channels] - out_u[:, :channels])
        return torch.cat([mean, out_c[:, channels:]], dim=1) if out_c.shape[1] > channels else mean

    def __call__(self, x_t: Tensor, t: Tensor, cond: Condition | None = None, clip_x0: bool = False) -> Prediction:
        return self.decode(self.output(x_t, t, cond), x_t, t, clip_x0=clip_x0)

    def decode(self, output: Tensor, x_t: Tensor, t: Tensor, clip_x0: bool = False) -> Prediction:
        """A raw output -> Prediction under the diffusion's prediction type and output layout.

        With ``clip_x0`` x0 is clipped to [-1, 1] and eps recomputed from it, so both describe the same point
        (diffusers' ``use_clipped_model_output``); ``mean_output`` stays the unclipped network output.
        """
        d, channels = self.diffusion, x_t.shape[1]
        mean_part, v = (output[:, :channels], output[:, channels:]) if d.learned_variance else (output, None)
        if d.prediction_type == "eps":
            eps, x0 = mean_part, d.x0_from_eps(x_t, t, mean_part)
        elif d.prediction_type == "x0":
            x0, eps = mean_part, d.eps_from_x0(x_t, t, mean_part)
        else:
            x0, eps = d.x0_from_v(x_t, t, mean_part), d.eps_from_v(x_t, t, mean_part)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = d.eps_from_x0(x_t, t, x0)
        return Prediction(x0=x0, eps=eps, mean_output=mean_part, v=v)

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the mean part of the output should be for (x0, noise) at t, in the net's parameterisation."""
        d = self.diffusion
        if d.prediction_type == "eps":
            return noise
        if d.prediction_type == "x0":
            return x0
        return d.v_from_x0_eps(x0, t, noise)

    def _checked(self, output: Tensor, x_t: Tensor) -> Tensor:
        want = net_output_channels(x_t.shape[1], self.diffusion.variance)
        if output.shape[0] != x_t.shape[0] or output.shape[2:] != x_t.shape[2:] or output.shape[1] != want:
            raise ValueError(f"the network returned shape {tuple(output.shape)} for input {tuple(x_t.shape)} with "
                             f"diffusion.variance={self.diffusion.variance}, which needs {want} channels; "
                             f"{_channels_fix(self.diffusion, want)}")
        return output.to(x_t.dtype)  # a low-precision (autocast) output is decoded in x_t's dtype


def as_denoiser(net: nn.Module | Denoiser, diffusion: GaussianDiffusion | None = None) -> Denoiser:
    """``net`` itself if it is a Denoiser, else ``Denoiser(net, diffusion)``."""
    if isinstance(net, Denoiser):
        return net
    if diffusion is None:
        raise TypeError("a plain net needs its diffusion: as_denoiser(net, diffusion)")
    return Denoiser(net, diffusion)
