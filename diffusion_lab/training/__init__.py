"""Training: the LightningModule and its learning-rate schedules."""

from diffusion_lab.training.module import DiffusionModule, NonFiniteLossError
from diffusion_lab.training.warmup import linear_warmup

__all__ = ["DiffusionModule", "NonFiniteLossError", "linear_warmup"]
