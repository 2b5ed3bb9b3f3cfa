"""diffusers-style pipelines: ``DDPMPipeline(unet, scheduler)(batch_size=...)`` -> ``ImagePipelineOutput``.

The call signatures are those of ``diffusers.DDPMPipeline`` and ``diffusers.DDIMPipeline``; sampling itself is
this project's samplers (tested step by step against diffusers' schedulers).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffusion_lab.nets.unet import UNet
from diffusion_lab.pipelines.diffusers_format import DIFFUSERS_VERSION, load_unet, save_unet
from diffusion_lab.pipelines.scheduler import SchedulerConfig
from diffusion_lab.samplers import DDIMSampler, DDPMSampler
from diffusion_lab.samplers.base import Sampler

OUTPUT_TYPES = ("pil", "np", "pt")
# One generator for the batch, or a list with one per image (image k draws all its noise from generator k).
Generators = torch.Generator | list[torch.Generator] | None


@dataclasses.dataclass
class ImagePipelineOutput:
    """``images``: a list of PIL images, or an array (batch, height, width, channels) in [0, 1]."""

    images: list[Image.Image] | np.ndarray | torch.Tensor


class DiffusionPipeline:
    """A U-Net and its noise schedule; subclasses choose the sampler from the call's arguments."""

    scheduler_class_name = "DDPMScheduler"

    def __init__(self, unet: UNet, scheduler: SchedulerConfig) -> None:
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
        return cls(model.net, SchedulerConfig.from_diffusion(model.diffusion, **(defaults | scheduler_kwargs)))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "DiffusionPipeline":
        """From a diffusers-layout folder (this project's ``save_pretrained`` or diffusers')."""
        folder = Path(folder)
        if not (folder / "unet").is_dir() or not (folder / "scheduler").is_dir():
            raise FileNotFoundError(f"{folder} is not a pipeline folder (needs unet/ and scheduler/)")
        return cls(load_unet(folder / "unet"), SchedulerConfig.load(folder / "scheduler"))

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
    def _generate(self, sampler: Sampler, batch_size: int, generator: Generators, output_type: str,
                  return_dict: bool) -> ImagePipelineOutput | tuple:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(OUTPUT_TYPES)}")
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
        images = sampler.sample(self.unet, self.diffusion, shape, generator=generator, device=self.device)
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
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        sampler = DDPMSampler(num_steps=num_inference_steps, spacing=self.scheduler.timestep_spacing,
                              variance=self.scheduler.variance_type, clip_denoised=self.scheduler.clip_sample,
                              progress=True)
        return self._generate(sampler, batch_size, generator, output_type, return_dict)


class DDIMPipeline(DiffusionPipeline):
    """DDIM (Song et al. eq. 12) with ``eta`` and the scheduler's ``clip_sample`` and ``timestep_spacing``."""

    scheduler_class_name = "DDIMScheduler"

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Generators = None, eta: float = 0.0,
                 num_inference_steps: int = 50, use_clipped_model_output: bool | None = None,
                 output_type: str = "pil", return_dict: bool = True) -> ImagePipelineOutput | tuple:
        sampler = DDIMSampler(num_steps=num_inference_steps, spacing=self.scheduler.timestep_spacing, eta=eta,
                              clip_denoised=self.scheduler.clip_sample,
                              use_clipped_model_output=bool(use_clipped_model_output), progress=True)
        return self._generate(sampler, batch_size, generator, output_type, return_dict)
