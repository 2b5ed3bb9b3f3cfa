"""Turning model outputs into pictures: [-1, 1] tensors -> uint8, upscaled grids, PNG files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

# Mid grey: distinct from both the black background and the white strokes of digits, and from most photos' edges.
GRID_BACKGROUND = 128


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8, rounding to nearest (the same for generated and real images)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_image(images: torch.Tensor, nrow: int | None = None, min_size: int = 64, padding: int | None = None,
               pad_value: int = GRID_BACKGROUND) -> Image.Image:
    """A grid of [-1, 1] images as a PIL image; tiny images are upscaled (nearest) to at least ``min_size``.

    Cells are separated by ``padding`` pixels of ``pad_value`` (default: an eighth of the upscaled cell, at least
    2 px, of mid grey), so that neither white strokes nor a black background run from one cell into the next.
    """
    images = images.detach().cpu().float()
    factor = max(1, -(-min_size // images.shape[-1]))
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    if padding is None:
        padding = grid_padding(images.shape[-1])
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(to_uint8(images), nrow=nrow, padding=padding, pad_value=pad_value)
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if images.shape[1] == 1 else array)


def grid_padding(cell_size: int) -> int:
    """Pixels between (and around) the cells of a grid of ``cell_size``-pixel images: size // 8, at least 2."""
    return max(2, cell_size // 8)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, min_size: int = 64) -> Path:
    """Write a PNG grid atomically (temporary file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    grid_image(images, nrow=nrow, min_size=min_size).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
