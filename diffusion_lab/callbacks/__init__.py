"""When to sample and evaluate during training (how is owned by samplers/ and metrics/), what the console shows, and
the host-sync check of training steps."""

from diffusion_lab.callbacks.evaluation import FIDEvaluation
from diffusion_lab.callbacks.likelihood import BPDEvaluation
from diffusion_lab.callbacks.progress import StepProgressBar
from diffusion_lab.callbacks.sample_grid import SampleGrid
from diffusion_lab.callbacks.sync_check import SyncCheck

__all__ = ["BPDEvaluation", "FIDEvaluation", "SampleGrid", "StepProgressBar", "SyncCheck"]
