"""Turning model outputs into pictures: [-1, 1] tensors -> uint8, upscaled grids, PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, rounding to nearest (the same for generated and real images)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(images: torch.Tensor, nrow: int | None = None, min_size: int = 64, padding: int = 2) -> Image.Image:
    """A grid of [-1, 1] images as a PIL image; tiny images are upscaled (nearest) to at least ``min_size``."""
    images = images.detach().cpu().float()
    factor = max(1, -(-min_size // images.shape[-1]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(to_uint8(images), nrow=nrow, padding=padding, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if images.shape[1] == 1 else array)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, min_size: int = 64) -> Path:
    """Write a PNG grid atomically (temporary file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    grid_image(images, nrow=nrow, min_size=min_size).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
