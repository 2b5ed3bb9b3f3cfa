"""When to sample and evaluate during training (how is owned by samplers/ and metrics/), and what the console shows."""

from diffusion_lab.callbacks.evaluation import FIDEvaluation
from diffusion_lab.callbacks.likelihood import BPDEvaluation
from diffusion_lab.callbacks.progress import StepProgressBar
from diffusion_lab.callbacks.sample_grid import SampleGrid

__all__ = ["BPDEvaluation", "FIDEvaluation", "SampleGrid", "StepProgressBar"]
