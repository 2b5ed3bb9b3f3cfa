"""Where samplers get their Gaussian noise: one ``torch.Generator`` for the batch, or one per image.

A list of generators (one per image, as diffusers' pipelines accept) draws image k's noise from generator k.

With a base ``seed`` the noise of image ``i`` (x_T and every later draw) comes from a generator seeded by
(seed, i) alone, so a set of images is the same whatever the batch size or the number of processes that
draw it: evaluation shards indices across ranks and still gets the same images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of the set drawn with base ``seed`` (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class Noise:
    """Draws standard-normal tensors of a fixed batch shape, from ``generator`` or per-image seeded generators."""

    def __init__(
        self,
        shape: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        if generator is not None and seed is not None:
            raise ValueError("pass either generator= or seed=, not both")
        self.shape, self.device, self.dtype, self.generator = tuple(shape), device, dtype, generator
        self.per_image: list[torch.Generator] | None = None
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.shape[0]:
                raise ValueError(f"a list of {len(generator)} generators for a batch of {self.shape[0]} images; "
                                 "pass one generator per image, or a single generator")
            self.per_image, self.generator = list(generator), None
        if seed is not None:
            indices = list(range(self.shape[0])) if indices is None else list(indices)
            if len(indices) != self.shape[0]:
                raise ValueError(f"{len(indices)} indices for a batch of {self.shape[0]} images")
            self.per_image = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]

    def __call__(self) -> Tensor:
        if self.per_image is None:
            return torch.randn(self.shape, generator=self.generator, device=self.device, dtype=self.dtype)
        # Drawn on each generator's own device, then moved (diffusers' randn_tensor does the same).
        return torch.stack(
            [torch.randn(self.shape[1:], generator=g, device=g.device, dtype=self.dtype) for g in self.per_image]
        ).to(self.device)
