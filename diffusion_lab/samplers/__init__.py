"""Reverse processes. Each sampler is a frozen dataclass (its fields are its config) with one ``sample`` entry.

The registry is conf/sampler/*.yaml (samplers/registry.py); the imports here are a convenience only."""

from diffusion_lab.samplers.base import Sampler
from diffusion_lab.samplers.ddim import DDIMSampler, slerp
from diffusion_lab.samplers.ddpm import DDPMSampler
from diffusion_lab.samplers.dpm_solver import DPMSolverSampler
from diffusion_lab.samplers.dpm_solver_3m import DPMSolver3MSampler
from diffusion_lab.samplers.euler_ancestral import EulerAncestralSampler
from diffusion_lab.samplers.heun import HeunSampler
from diffusion_lab.samplers.ipndm import IPNDMSampler
from diffusion_lab.samplers.noise import Noise, image_seed
from diffusion_lab.samplers.sde_dpm_solver import SDEDPMSolverSampler
from diffusion_lab.samplers.timesteps import SPACINGS, timesteps
from diffusion_lab.samplers.unipc import UniPCSampler


def __getattr__(name: str):
    """``SAMPLERS``: registered name -> class, read from conf/sampler/*.yaml (samplers/registry.py)."""
    if name == "SAMPLERS":
        from diffusion_lab.samplers.registry import classes

        return classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Sampler", "DDPMSampler", "DDIMSampler", "DPMSolverSampler", "DPMSolver3MSampler", "SDEDPMSolverSampler",
    "UniPCSampler", "IPNDMSampler", "HeunSampler", "EulerAncestralSampler", "SAMPLERS", "SPACINGS", "Noise",
    "image_seed", "slerp", "timesteps",
]
