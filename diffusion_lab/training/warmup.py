"""Learning-rate schedules used as ``_partial_`` configs (``optimizer`` is filled in by the module)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: Optimizer, warmup_steps: int) -> LambdaLR:
    """lr * min(step / warmup_steps, 1), the DDPM recipe (``diffusion_tf``'s ``get_warmed_up_lr``), step from 0."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return LambdaLR(optimizer, lambda step: min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0)
