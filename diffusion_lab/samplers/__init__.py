"""Reverse processes. Each sampler is a frozen dataclass (its fields are its config) with one ``sample`` entry."""

from diffusion_lab.samplers.base import Sampler
from diffusion_lab.samplers.ddim import DDIMSampler
from diffusion_lab.samplers.ddpm import DDPMSampler
from diffusion_lab.samplers.timesteps import SPACINGS, timesteps

__all__ = ["Sampler", "DDPMSampler", "DDIMSampler", "SPACINGS", "timesteps"]
