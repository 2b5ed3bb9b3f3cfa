"""diffusion_lab: DDPM / DDIM training, sampling and evaluation on PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
