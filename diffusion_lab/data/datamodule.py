"""One LightningDataModule for every source: resizing, flips, channel conversion and scaling to [-1, 1]."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2 as T

from diffusion_lab.data.sources import DataError


class ImageTransform:
    """PIL image or [0, 1] tensor -> float tensor (channels, size, size) in [-1, 1]."""

    def __init__(self, image_size: int, channels: int, hflip: bool = False, center_crop: bool = True) -> None:
        if channels not in (1, 3):
            raise DataError(f"data.channels={channels} is not supported; allowed: 1, 3")
        self.image_size, self.channels, self.hflip, self.center_crop = image_size, channels, hflip, center_crop
        ops: list[Any] = []
        if center_crop:
            ops.append(_CenterSquare())
        ops += [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(image_size)]
        self.resize = T.Compose(ops)

    def __call__(self, item: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(item, Image.Image):
            item = T.functional.pil_to_tensor(item.convert("L" if self.channels == 1 else "RGB"))
            item = item.float().div(255.0)
        if item.shape[0] != self.channels:
            if item.shape[0] == 1:
                item = item.expand(self.channels, -1, -1)
            elif self.channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
                item = (item[:3] * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        if item.shape[-2:] != (self.image_size, self.image_size):
            item = self.resize(item).clamp(0, 1)
        if self.hflip and torch.rand(()) < 0.5:
            item = item.flip(-1)
        return item * 2 - 1


class _CenterSquare:
    """Crop the largest centred square (before resizing non-square images)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return T.functional.center_crop(x, [min(h, w)]) if h != w else x


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform: ImageTransform) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.base[index])


class DiffusionDataModule(L.LightningDataModule):
    """Training images in [-1, 1], shape (channels, image_size, image_size), from any source.

    ``name`` identifies the data set in reference-statistics caches and reports.
    """

    def __init__(
        self,
        source: Any,
        name: str = "data",
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        center_crop: bool = True,
        limit: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
        quantization_levels: int = 256,  # intensity levels of the stored images (the likelihood's bin width)
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        self.source, self.name, self.batch_size, self.num_workers = source, name, batch_size, num_workers
        self.limit, self.pin_memory, self.drop_last = limit, pin_memory, drop_last
        self.quantization_levels = quantization_levels
        self.transform = ImageTransform(image_size, channels, hflip=hflip, center_crop=center_crop)
        self.train_set: Dataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.transform.channels, self.transform.image_size, self.transform.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        base = self.source.load()
        if self.limit is not None:
            base = Subset(base, range(min(self.limit, len(base))))  # type: ignore[arg-type]
        if len(base) == 0:  # type: ignore[arg-type]
            raise DataError(f"the data set from data.source ({type(self.source).__name__}) is empty")
        if self.drop_last and len(base) < self.batch_size:  # type: ignore[arg-type]
            raise DataError(
                f"data.batch_size={self.batch_size} is larger than the data set ({len(base)} images) "  # type: ignore[arg-type]
                "and drop_last would leave no batch; lower data.batch_size"
            )
        self.train_set = _Transformed(base, self.transform)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def check_model(self, net: torch.nn.Module) -> None:
        """Fail fast when the model's input shape does not match the data."""
        config = getattr(net, "config", None)
        if config is None:
            return
        want = (config.in_channels, config.image_size, config.image_size)
        if want != self.image_shape:
            raise DataError(
                f"the model expects images of shape {want} (model.net.in_channels, model.net.image_size) but the data "
                f"gives {self.image_shape} (data.channels, data.image_size); make them agree"
            )

