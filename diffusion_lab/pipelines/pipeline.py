"""diffusers-style pipelines: ``DDPMPipeline(unet, scheduler)(batch_size=...)`` -> ``ImagePipelineOutput``.

The call signatures are those of ``diffusers.DDPMPipeline`` and ``diffusers.DDIMPipeline``; sampling itself is
this project's samplers (tested step by step against diffusers' schedulers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from diffusion_lab.diffusion.denoiser import Condition, Denoiser, check_guidance_scale, net_output_channels
from diffusion_lab.errors import CheckpointNotFoundError, UserError
from diffusion_lab.nets.unet import UNet
from diffusion_lab.pipelines.diffusers_format import DIFFUSERS_VERSION, FormatError, load_unet, read_json, save_unet
from diffusion_lab.pipelines.scheduler import SCHEDULER_CLASSES, SchedulerConfig
from diffusion_lab.samplers import DDIMSampler, DDPMSampler
from diffusion_lab.samplers.base import Sampler

OUTPUT_TYPES = ("pil", "np", "pt")
# One generator for the batch, or a list with one per image (image k draws all its noise from generator k).
Generators = torch.Generator | list[torch.Generator] | None


class PipelineArgumentError(UserError, ValueError):
    """A pipeline call argument that cannot work (``output_type``, ``batch_size``, ...); the message names it."""


@dataclasses.dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, or an array (batch, height, width, channels) in [0, 1]."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


class DiffusionPipeline:
    """A U-Net and its noise schedule; subclasses choose the sampler from the call's arguments."""

    scheduler_class_name = "DDPMScheduler"
    # DDIMPipeline's num_inference_steps when the call gives none: diffusers' 50, or a distilled student's N
    default_num_inference_steps = 50

    def __init__(self, unet: UNet, scheduler: SchedulerConfig) -> None:
        channels, out = unet.config.in_channels, unet.config.out_channels
        want = net_output_channels(channels, scheduler.variance_type)
        if out != want:  # else the first sampling step fails, far from the cause
            fix = ("a U-Net with out_channels = 2 x in_channels (the mean and the v of the learned variance), or "
                   "variance_type fixed_large or fixed_small" if want > channels
                   else "variance_type=learned_range for a U-Net with 2 x in_channels outputs")
            raise FormatError(f"the U-Net has {out} output channels for {channels}-channel images, but the scheduler's "
                              f"variance_type={scheduler.variance_type!r} needs {want}; use {fix}")
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.diffusion = scheduler.diffusion().to(next(unet.parameters()).device)

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | Path, use_ema: bool = True, **scheduler_kwargs: Any) -> "DiffusionPipeline":
        """From a training checkpoint (``last.ckpt``), with the EMA weights unless ``use_ema=False``."""
        from diffusion_lab.loading import load_model

        model = load_model(path, use_ema)
        sampler = model.sampler
        defaults: dict[str, Any] = {}
        if isinstance(sampler, DDPMSampler):
            defaults = {"variance_type": sampler.variance, "clip_sample": sampler.clip_denoised}
        elif sampler is not None:
            defaults = {"clip_sample": sampler.clip_denoised}
        student = bool((model.config or {}).get("distillation")) and isinstance(sampler, DDIMSampler)
        if student:  # a distilled student samples on the spacing and with the steps it was distilled for
            defaults["timestep_spacing"] = sampler.spacing
        pipe = cls(model.net, SchedulerConfig.from_diffusion(model.diffusion, **(defaults | scheduler_kwargs)))
        if student:
            pipe.default_num_inference_steps = sampler.num_steps
        return pipe

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DiffusionPipeline":
        """From a diffusers-layout folder (this project's ``save_pretrained`` or diffusers')."""
        folder = Path(folder)
        index = folder / "model_index.json"
        if not index.is_file():
            raise CheckpointNotFoundError(
                f"{index} not found: {folder} is not a diffusers pipeline folder (diffusers needs model_index.json "
                "too); write the folder with save_pretrained, or add model_index.json: "
                f'{{"_class_name": "{cls.__name__ if cls is not DiffusionPipeline else "DDPMPipeline"}", '
                '"unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}')
        entries = read_json(index)
        for part, allowed in (("unet", ("UNet2DModel",)), ("scheduler", SCHEDULER_CLASSES)):
            entry = entries.get(part)
            if entry is not None and (not isinstance(entry, list) or not entry or entry[-1] not in allowed):
                raise FormatError(f"{index}: {part}={json.dumps(entry)} is not supported: diffusers would load "
                                  f"that class, this project reads only {' or '.join(allowed)}; save the pipeline "
                                  "with those")
        unet, scheduler = load_unet(folder / "unet"), SchedulerConfig.load(folder / "scheduler")
        try:
            return cls(unet, scheduler)
        except FormatError as error:
            raise FormatError(f"{folder}: {error}") from error

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the diffusers layout; ``diffusers.DDPMPipeline.from_pretrained(folder)`` loads it."""
        folder = Path(folder)
        save_unet(self.unet, folder / "unet")
        self.scheduler.save(folder / "scheduler", self.scheduler_class_name)
        index = {"_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", self.scheduler_class_name], "unet": ["diffusers", "UNet2DModel"]}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return folder

    def to(self, device: torch.device | str) -> "DiffusionPipeline":
        self.unet.to(device)
        self.diffusion.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # --- sampling ----------------------------------------------------------------------------------
    def _check_call(self, batch_size: int, generator: Generators, num_inference_steps: int, output_type: str) -> None:
        """The call's arguments, in diffusers' names, before any sampling starts."""
        if output_type not in OUTPUT_TYPES:
            raise PipelineArgumentError(f"output_type={output_type!r} is not supported; allowed: "
                                        f"{', '.join(OUTPUT_TYPES)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise PipelineArgumentError(f"batch_size={batch_size!r} must be an int >= 1")
        if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
            raise PipelineArgumentError(f"a list of {len(generator)} generators for a batch of {batch_size} images; "
                                        "pass one generator per image, or a single generator")
        steps = self.scheduler.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= steps:
            raise PipelineArgumentError(f"num_inference_steps={num_inference_steps!r} must be an int from 1 to "
                                        f"{steps} (the scheduler's num_train_timesteps)")

    def _condition(self, batch_size: int, class_labels: Sequence[int] | torch.Tensor | None,
                   guidance_scale: float) -> tuple[int, Condition | None]:
        """(batch size, condition): with ``class_labels`` (one per image, as diffusers' DiTPipeline) the batch is
        one image per label; ``guidance_scale`` 1 is the conditional model alone, > 1 guided, 0 unconditional."""
        num_classes = getattr(self.unet.config, "num_classes", None)
        guidance_scale = check_guidance_scale(guidance_scale, PipelineArgumentError)
        if class_labels is None:
            if guidance_scale != 1:
                raise PipelineArgumentError(f"guidance_scale={guidance_scale:g} needs class_labels=[...] to guide "
                                            "towards")
            return batch_size, None
        if num_classes is None:
            raise PipelineArgumentError("class_labels were given, but this U-Net is unconditional (built without "
                                        "num_classes); call the pipeline without class_labels")
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if len(labels) == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise PipelineArgumentError(f"class_labels must be class indices from 0 to {num_classes - 1}, got "
                                        f"{labels.tolist()}")
        if batch_size not in (1, len(labels)):
            raise PipelineArgumentError(f"batch_size={batch_size} with {len(labels)} class_labels: one image is drawn "
                                        "per label; leave batch_size out")
        return len(labels), Condition(labels, check_guidance_scale(guidance_scale, PipelineArgumentError))

    def _generate(self, sampler: Sampler, batch_size: int, generator: Generators, output_type: str,
                  return_dict: bool, cond: Condition | None = None) -> ImagePipelineOutput | tuple:
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
        images = sampler.sample(Denoiser(self.unet, self.diffusion), None, shape, generator=generator,
                                device=self.device, cond=cond)
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            out: Any = images
        else:
            out = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                out = [to_pil(image) for image in out]
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, C) floats in [0, 1] -> PIL, rounding as diffusers' ``numpy_to_pil``."""
    array = (image * 255).round().astype("uint8")
    return Image.fromarray(array[..., 0], mode="L") if array.shape[-1] == 1 else Image.fromarray(array)


class DDPMPipeline(DiffusionPipeline):
    """Ancestral sampling (Ho et al. Algorithm 2) with the scheduler's ``variance_type`` and ``clip_sample``."""

    scheduler_class_name = "DDPMScheduler"

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Generators = None, num_inference_steps: int = 1000,
                 output_type: str = "pil", return_dict: bool = True, class_labels: Sequence[int] | None = None,
                 guidance_scale: float = 1.0) -> ImagePipelineOutput | tuple:
        batch_size, cond = self._condition(batch_size, class_labels, guidance_scale)
        self._check_call(batch_size, generator, num_inference_steps, output_type)
        sampler = DDPMSampler(num_steps=num_inference_steps, spacing=self.scheduler.timestep_spacing,
                              variance=self.scheduler.variance_type, clip_denoised=self.scheduler.clip_sample,
                              progress=True)
        return self._generate(sampler, batch_size, generator, output_type, return_dict, cond)


class DDIMPipeline(DiffusionPipeline):
    """DDIM (Song et al. eq. 12) with ``eta`` and the scheduler's ``clip_sample`` and ``timestep_spacing``."""

    scheduler_class_name = "DDIMScheduler"

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Generators = None, eta: float = 0.0,
                 num_inference_steps: int | None = None, use_clipped_model_output: bool | None = None,
                 output_type: str = "pil", return_dict: bool = True, class_labels: Sequence[int] | None = None,
                 guidance_scale: float = 1.0) -> ImagePipelineOutput | tuple:
        """``num_inference_steps=None``: 50 (diffusers' default), or the N steps a distilled student was trained for
        (``from_checkpoint`` of a ``student_<N>steps.ckpt``)."""
        if num_inference_steps is None:
            num_inference_steps = self.default_num_inference_steps
        batch_size, cond = self._condition(batch_size, class_labels, guidance_scale)
        self._check_call(batch_size, generator, num_inference_steps, output_type)
        if not isinstance(eta, (int, float)) or not eta >= 0:
            raise PipelineArgumentError(f"eta={eta!r} must be a number >= 0 (0: deterministic DDIM, 1: DDPM-like)")
        sampler = DDIMSampler(num_steps=num_inference_steps, spacing=self.scheduler.timestep_spacing, eta=eta,
                              clip_denoised=self.scheduler.clip_sample,
                              use_clipped_model_output=bool(use_clipped_model_output), progress=True)
        return self._generate(sampler, batch_size, generator, output_type, return_dict, cond)
