"""Diffusion maths: beta schedules and the Gaussian forward process."""

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.schedules import SCHEDULES, make_betas, rescale_zero_terminal_snr

__all__ = ["GaussianDiffusion", "SCHEDULES", "make_betas", "rescale_zero_terminal_snr"]
