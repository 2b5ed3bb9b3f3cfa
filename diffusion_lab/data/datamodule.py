"""One LightningDataModule for every source: resizing, flips, channel conversion and scaling to [-1, 1].

Two ways to feed the training loop:

* per image (``in_memory=false``): a map-style data set decodes, converts and flips each image in the loader
  (workers help); the path for data sets larger than memory (CelebA-HQ, LSUN, large folders).
* in memory (``in_memory=true``): at ``setup`` every image is decoded and resized once into one tensor
  (uint8 for 8-bit sources such as PNG/JPEG, float32 for tensor sources such as the digits); a training batch is
  then one index into that tensor, and ``on_after_batch_transfer`` (Lightning calls it on the training device)
  scales it to [-1, 1] and flips a random half of it in two whole-batch operations. No per-image Python runs per
  step. CIFAR-10 is 50,000 x 3,072 bytes = 150 MB this way.

Batches. A source without labels (``num_classes`` None) gives plain image tensors (B, C, H, W). A source with
labels gives ``(images, labels)`` tuples, ``labels`` int64 of shape (B,) (the class of each image, 0..K-1): the
in-memory path keeps one int64 label tensor beside the image tensor and gathers both with the same indices, so
labels follow the same shuffle (and mid-epoch resume) as their images; flips never touch them. Item access
(``train_set[i]``, ``train_set.base[i]``) gives images only, on either path; ``train_set.labels`` holds the labels.
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.transforms import v2 as T

from diffusion_lab.data.sampler import ResumableDataLoader
from diffusion_lab.data.sources import DataError, TensorImages

Channels = Literal[1, 3]  # grey or RGB
CHANNELS: tuple[int, ...] = get_args(Channels)


class ImageTransform:
    """PIL image, uint8 tensor or [0, 1] float tensor -> float tensor (channels, size, size) in [-1, 1].

    ``to_unit`` does the deterministic part (decode, channels, crop, resize; [0, 1]); ``__call__`` adds the
    random flip and the scaling, and ``finish_batch`` does the same two steps on a whole batch at once.
    """

    def __init__(self, image_size: int, channels: Channels, hflip: bool = False, center_crop: bool = True) -> None:
        if channels not in CHANNELS:
            raise DataError(f"data.channels={channels!r} is not allowed; allowed values: {', '.join(map(str, CHANNELS))}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise DataError(f"data.image_size={image_size!r}: needs a positive whole number of pixels, e.g. 32")
        self.image_size, self.channels, self.hflip, self.center_crop = image_size, channels, hflip, center_crop
        ops: list[Any] = []
        if center_crop:
            ops.append(_CenterSquare())
        ops += [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(image_size)]
        self.resize = T.Compose(ops)

    def to_unit(self, item: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(item, Image.Image):
            item = T.functional.pil_to_tensor(item.convert("L" if self.channels == 1 else "RGB"))
        if item.dtype == torch.uint8:
            item = item.float().div(255.0)
        if item.shape[0] != self.channels:
            if item.shape[0] == 1:
                item = item.expand(self.channels, -1, -1)
            elif self.channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L")
                item = (item[:3] * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        if item.shape[-2:] != (self.image_size, self.image_size):
            item = self.resize(item).clamp(0, 1)
        return item

    def __call__(self, item: Image.Image | torch.Tensor) -> torch.Tensor:
        item = self.to_unit(item)
        if self.hflip and torch.rand(()) < 0.5:
            item = item.flip(-1)
        return item * 2 - 1

    def finish_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch of ``to_unit`` images (uint8 or [0, 1] float) -> [-1, 1], a random half mirrored (if hflip).

        The same arithmetic as ``__call__`` (so both paths give identical values), as whole-batch operations on
        the batch's device; the flips draw from that device's generator (restored on resume with the rest).
        """
        if self.hflip:  # before the conversion: on 1-byte pixels
            mirror = torch.rand(batch.shape[0], device=batch.device) < 0.5
            batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
        if batch.dtype == torch.uint8:
            return batch.float().div_(255.0).mul_(2).sub_(1)
        return batch.mul(2).sub_(1)


class _CenterSquare:
    """Crop the largest centred square (before resizing non-square images)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return T.functional.center_crop(x, [min(h, w)]) if h != w else x


class _Transformed(Dataset):
    def __init__(self, base: Dataset, transform: ImageTransform, labels: torch.Tensor | None = None) -> None:
        self.base, self.transform, self.labels = base, transform, labels

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.base[index])


class _Unit(Dataset):
    """``base`` through ``to_unit``, as uint8 when ``quantize`` (images decoded once for the in-memory tensor)."""

    def __init__(self, base: Dataset, transform: ImageTransform, quantize: bool) -> None:
        self.base, self.transform, self.quantize = base, transform, quantize

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.base[index]
        if self.quantize and isinstance(item, Image.Image) and item.size == (self.transform.image_size,) * 2:
            # The native 8-bit pixels, without a float round trip.
            return T.functional.pil_to_tensor(item.convert("L" if self.transform.channels == 1 else "RGB"))
        unit = self.transform.to_unit(item)
        return unit.mul(255).round().to(torch.uint8) if self.quantize else unit


class InMemoryImages(Dataset):
    """Every training image in one tensor (N, C, H, W): uint8 for 8-bit sources, float32 in [0, 1] otherwise.

    Indexing one image gives it finished (flipped at random, in [-1, 1]) like the per-image path, so code that
    reads ``datamodule.train_set`` item by item (reference statistics) works on either path.
    """

    def __init__(self, images: torch.Tensor, transform: ImageTransform, labels: torch.Tensor | None = None) -> None:
        self.images, self.transform, self.labels = images, transform, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index])

    @property
    def base(self) -> torch.Tensor:
        """The stored, unfinished images (what ``transform`` finishes), as ``_Transformed.base``."""
        return self.images


class _RawBatches(TensorImages):
    """The loader's view of :class:`InMemoryImages`: a batch of indices is one gather (``__getitems__``, which
    torch's DataLoader calls with the sampler's whole batch), left unscaled for ``finish_batch`` on the device;
    with labels, one more gather of the label tensor with the same indices: ``(images, labels)``."""

    def __getitems__(self, indices: list[int]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        images = self.images[index]
        return images if self.labels is None else (images, self.labels[index])


def _whole_batch(batch: Any) -> Any:
    """collate_fn for :class:`_RawBatches`: the gather already made the batch (a named function: picklable)."""
    return batch


class _WithLabels(Dataset):
    """The per-image loader's view of a labelled data set: item i is (finished image i, its int64 label)."""

    def __init__(self, data: _Transformed) -> None:
        self.data, self.labels = data, data.labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.labels[index]  # type: ignore[index]


def _image_label_tuples(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_fn for :class:`_WithLabels`: torch's default collation, as a tuple (it would give a list)."""
    images, labels = default_collate(samples)
    return images, labels


def _labels_of(data: Any) -> torch.Tensor | None:
    """The int64 labels of a source's data set (through ``Subset``s, e.g. ``data.limit``), or None."""
    if isinstance(data, Subset):
        labels = _labels_of(data.dataset)
        return None if labels is None else labels[torch.as_tensor(list(data.indices), dtype=torch.long)]
    labels = getattr(data, "labels", None)
    return None if labels is None else torch.as_tensor(labels, dtype=torch.int64)


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class DiffusionDataModule(L.LightningDataModule):
    """Training images in [-1, 1], shape (channels, image_size, image_size), from any source.

    ``name`` identifies the data set in reference-statistics caches and reports.
    """

    def __init__(
        self,
        source: Any,
        name: str = "data",
        image_size: int = 32,
        channels: Channels = 3,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        center_crop: bool = True,
        limit: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = True,
        in_memory: bool = False,
        quantization_levels: int = 256,  # intensity levels of the stored images (the likelihood's bin width)
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"data.batch_size must be >= 1, got {batch_size}")
        self.source, self.name, self.batch_size, self.num_workers = source, name, batch_size, num_workers
        self.limit, self.pin_memory, self.drop_last, self.in_memory = limit, pin_memory, drop_last, in_memory
        self.quantization_levels = quantization_levels
        self.transform = ImageTransform(image_size, channels, hflip=hflip, center_crop=center_crop)
        self.train_set: Dataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.transform.channels, self.transform.image_size, self.transform.image_size)

    @property
    def labels(self) -> torch.Tensor | None:
        """The training images' classes, int64 (N,), or None for an unlabelled source (runs ``setup`` if needed)."""
        self.setup()
        return self.train_set.labels  # type: ignore[union-attr]

    @property
    def num_classes(self) -> int | None:
        """How many classes the source's labels have (None: no labels; batches are then plain image tensors).

        Runs ``setup`` if needed (a Hugging Face set or a folder knows its classes once loaded). The source's
        count, not the count present under ``data.limit``.
        """
        labels = self.labels
        if labels is None:
            return None
        count = getattr(self.source, "num_classes", None)
        return int(count) if count is not None else (int(labels.max()) + 1 if len(labels) else 0)

    @property
    def class_names(self) -> list[str] | None:
        """The classes' names (index = class), where the source has names; None otherwise."""
        if self.labels is None:
            return None
        names = getattr(self.source, "class_names", None)
        return list(names) if names is not None else None

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
        labels = _labels_of(base)
        if labels is not None and len(labels) != len(base):  # type: ignore[arg-type]
            raise DataError(f"the data set from data.source ({type(self.source).__name__}) has {len(labels)} labels "
                            f"for {len(base)} images")  # type: ignore[arg-type]
        self.train_set = InMemoryImages(self._load_into_memory(base), self.transform, labels) if self.in_memory \
            else _Transformed(base, self.transform, labels)

    def _load_into_memory(self, base: Dataset) -> torch.Tensor:
        """Decode and resize every image once (in ``num_workers`` processes) into one tensor."""
        n, (c, h, w) = len(base), self.image_shape  # type: ignore[arg-type]
        quantize = isinstance(base[0], Image.Image)  # 8-bit images stay 8-bit; tensor sources stay float
        need, have = n * c * h * w * (1 if quantize else 4), _physical_memory_bytes()
        if have is not None and need > have // 2:
            raise DataError(
                f"data.in_memory=true needs {need / 2**30:.1f} GiB for {n} images of {c}x{h}x{w}, more than half of "
                f"this machine's {have / 2**30:.1f} GiB; set data.in_memory=false (per-image loading) or data.limit"
            )
        loader = DataLoader(_Unit(base, self.transform, quantize), batch_size=256, num_workers=self.num_workers)
        with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed: leave the run's stream as it was
            return torch.cat(list(loader))

    def train_dataloader(self) -> DataLoader:
        """Batches of finished images in [-1, 1]; on the in-memory path, of stored images (uint8 or [0, 1]) that
        :meth:`on_after_batch_transfer` finishes on the device (call it yourself when iterating by hand).
        With labels (``num_classes`` not None) each batch is ``(images, labels)``, labels int64 (B,).

        Both paths shuffle with the same ResumableDataLoader (a per-epoch seeded permutation), so the order of
        the images - and a resumed run, also from mid-epoch - is the same on either.
        """
        assert self.train_set is not None, "call setup() first"
        in_memory = isinstance(self.train_set, InMemoryImages)
        labelled = self.train_set.labels is not None  # type: ignore[union-attr]
        workers = 0 if in_memory else self.num_workers  # a gather from memory needs no worker processes
        if in_memory:
            data: Dataset = _RawBatches(self.train_set.images, self.train_set.labels)  # type: ignore[union-attr]
            collate = _whole_batch
        else:
            data = _WithLabels(self.train_set) if labelled else self.train_set  # type: ignore[arg-type]
            collate = _image_label_tuples if labelled else None
        return ResumableDataLoader(  # shuffled per epoch; a mid-epoch resume continues the same order exactly
            data,
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            persistent_workers=workers > 0,
            collate_fn=collate,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(self.train_set, InMemoryImages):
            if isinstance(batch, torch.Tensor):
                return self.transform.finish_batch(batch)
            if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
                return self.transform.finish_batch(batch[0]), batch[1]  # the labels as they are
        return batch

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
        wanted = getattr(config, "num_classes", None)
        if wanted is not None:  # a conditional net: the data must have labels, as many classes as the net
            have = self.num_classes
            if have is None:
                raise DataError(f"model.net.num_classes={wanted}, but this data has no class labels; set "
                                "data.source.label_column (Hugging Face sets), use one subfolder per class (folders), "
                                "or train an unconditional net (model.net.num_classes=null)")
            if have != wanted:
                raise DataError(f"model.net.num_classes={wanted}, but the data has {have} classes; set "
                                f"model.net.num_classes={have}")

