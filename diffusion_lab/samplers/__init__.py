"""Reverse processes. Each sampler is a frozen dataclass (its fields are its config) with one ``sample`` entry."""

from diffusion_lab.samplers.base import Sampler
from diffusion_lab.samplers.ddim import DDIMSampler, slerp
from diffusion_lab.samplers.ddpm import DDPMSampler
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler
from diffusion_lab.samplers.noise import Noise, image_seed
from diffusion_lab.samplers.timesteps import SPACINGS, timesteps



def __getattr__(name: str):
    """``SAMPLERS``: registered name -> class, read from conf/sampler/*.yaml (samplers/registry.py)."""
    if name == "SAMPLERS":
        from diffusion_lab.samplers.registry import classes

        return classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Sampler", "DDPMSampler", "DDIMSampler", "DPMSolverSampler", "SAMPLERS", "SPACINGS", "Noise", "image_seed",
    "slerp", "timesteps",
]
