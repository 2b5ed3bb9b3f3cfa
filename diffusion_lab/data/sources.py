"""Where images come from. Each source gives a map-style data set of PIL images (or, for the embedded digits,
of float tensors in [0, 1]); :mod:`diffusion_lab.data.datamodule` turns them into model inputs in [-1, 1].

Class labels: item ``i`` of a loaded data set is always just the image; its class is ``labels[i]``, where
``labels`` (an attribute of the loaded data set) is one int64 tensor of shape (N,), or None for unlabelled data.
Each source exposes ``num_classes`` (int, or None without labels) and, where the classes have names,
``class_names``; for a Hugging Face set or a folder both are known once ``load`` has run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffusion_lab.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(UserError, ValueError):
    """Bad or missing input data; the message names the file or key and the fix."""


class LabelColumnError(DataError):
    """``data.source.label_column`` names no column of integer class indices; the message lists the columns."""


class DigitsSource:
    """scikit-learn's handwritten digits: 1,797 real 8x8 grey images with 17 intensity levels (0..16).

    Ships inside scikit-learn, so the default run needs no network.
    """

    name = "digits"
    num_classes: int | None = 10
    class_names: list[str] | None = [str(d) for d in range(10)]

    def load(self) -> Dataset:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)  # (1797, 1, 8, 8) in [0, 1]
        return TensorImages(images, torch.from_numpy(digits.target).long())


class SyntheticSource:
    """Random images of a given shape (uniform noise), for throughput benchmarks and smoke tests."""

    name = "synthetic"
    num_classes: int | None = None  # noise has no classes
    class_names: list[str] | None = None

    def __init__(self, num_images: int = 4096, channels: int = 3, image_size: int = 32, seed: int = 0) -> None:
        self.num_images, self.channels, self.image_size, self.seed = num_images, channels, image_size, seed

    def load(self) -> Dataset:
        g = torch.Generator().manual_seed(self.seed)
        shape = (self.num_images, self.channels, self.image_size, self.image_size)
        return TensorImages(torch.rand(shape, generator=g))


class TensorImages(Dataset):
    """Images held in one tensor (N, C, H, W); item i is row i. ``labels``: (N,) int64 classes, or None."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if labels is not None and labels.shape != (len(images),):
            raise ValueError(f"labels of shape {tuple(labels.shape)} for {len(images)} images")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class HFSource:
    """A Hugging Face ``datasets`` image data set: a hub name (``uoft-cs/cifar10``), a local data set folder
    saved with ``save_to_disk``, or a local folder of parquet/arrow files, with one split.

    The image column is ``image_column`` if given, else the first column whose feature type is ``Image``.
    ``label_column`` (e.g. ``label`` for CIFAR-10): a column of integer class indices 0..K-1 (a ``ClassLabel``
    also gives the class names); None: the images have no labels.
    """

    name = "hf"

    def __init__(
        self,
        path: str,
        split: str = "train",
        config_name: str | None = None,
        image_column: str | None = None,
        cache_dir: str | None = None,
        revision: str | None = None,
        label_column: str | None = None,
    ) -> None:
        self.path, self.split, self.config_name = path, split, config_name
        self.image_column, self.cache_dir, self.revision = image_column, cache_dir, revision
        self.label_column = label_column
        self.num_classes: int | None = None  # known after load()
        self.class_names: list[str] | None = None

    def load(self) -> Dataset:
        import datasets

        try:
            if _saved_to_disk(Path(self.path)):
                ds: Any = datasets.load_from_disk(self.path)
            else:
                ds = datasets.load_dataset(
                    self.path, self.config_name, split=self.split, cache_dir=self.cache_dir, revision=self.revision
                )
        except (FileNotFoundError, ConnectionError, OSError) as error:
            if isinstance(error, DataError):
                raise
            raise DataError(
                f"could not load the data set data.source.path={self.path!r} (split {self.split!r}): {error}. "
                "Check the name, or point data.source.path at a local copy (a folder made by save_to_disk, or of "
                "parquet files); without network, set HF_DATASETS_OFFLINE=1 and use a cached or local copy."
            ) from error
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"data.source.split={self.split!r} is not in {self.path!r}; splits: {list(ds)}")
            ds = ds[self.split]
        column = self._image_column(ds)
        labels = self._labels(ds)
        return _HFImages(ds, column, labels)

    def _labels(self, ds: Any) -> torch.Tensor | None:
        """The ``label_column`` as one int64 tensor (one column read, no image decoded); sets ``num_classes``."""
        import datasets

        self.num_classes, self.class_names = None, None
        if self.label_column is None:
            return None
        columns = list(ds.features)
        if self.label_column not in ds.features:
            raise LabelColumnError(
                f"data.source.label_column={self.label_column!r} is not a column of {self.path!r}; columns: "
                f"{columns}. Set data.source.label_column to the column of class indices (CIFAR-10's is 'label'), "
                "or to null to train without labels"
            )
        feature = ds.features[self.label_column]
        dtype = getattr(feature, "dtype", None)
        if not isinstance(feature, datasets.ClassLabel) and not (
            isinstance(feature, datasets.Value) and str(dtype).startswith(("int", "uint"))
        ):
            raise LabelColumnError(
                f"data.source.label_column={self.label_column!r} of {self.path!r} holds {feature}, not integer class "
                f"indices; point it at a ClassLabel or integer column (columns: {columns}), or set it to null"
            )
        labels = torch.as_tensor(np.asarray(ds.with_format("numpy")[self.label_column][:]), dtype=torch.int64)
        if len(labels) and int(labels.min()) < 0:
            raise LabelColumnError(
                f"data.source.label_column={self.label_column!r} of {self.path!r} has a negative label "
                f"({int(labels.min())}: a missing label); every image needs a class 0..K-1, or set it to null"
            )
        if isinstance(feature, datasets.ClassLabel):
            self.num_classes, self.class_names = int(feature.num_classes), list(feature.names)
        else:
            self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        return labels

    def _image_column(self, ds: Any) -> str:
        import datasets

        columns = list(ds.features)
        if self.image_column is not None:
            if self.image_column not in ds.features:
                raise DataError(
                    f"data.source.image_column={self.image_column!r} is not a column of {self.path!r}; "
                    f"columns: {columns}"
                )
            return self.image_column
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                return name
        raise DataError(
            f"no column of type Image in {self.path!r} (columns: {columns}); set data.source.image_column=<name>"
        )


def _saved_to_disk(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / name).exists() for name in ("state.json", "dataset_dict.json"))


class _HFImages(Dataset):
    def __init__(self, ds: Any, column: str, labels: torch.Tensor | None = None) -> None:
        # Select the column once so that rows do not decode the other columns.
        self.ds, self.column, self.labels = ds.select_columns([column]), column, labels

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> Image.Image:
        image = self.ds[int(index)][self.column]
        if isinstance(image, dict):  # undecoded {"bytes", "path"}
            import io

            image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
        return image


class FolderSource:
    """Every image file below ``root`` (recursively), sorted by path.

    Labels as torchvision's ``ImageFolder``: with every image inside a subfolder of ``root``, each top-level
    subfolder is a class, numbered by the position of its name in sorted order (``class_names``); images lying
    directly in ``root`` mean no labels (``num_classes`` None).
    """

    name = "folder"

    def __init__(self, root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, verify: bool = False) -> None:
        self.root, self.extensions, self.verify = root, tuple(e.lower() for e in extensions), verify
        self.num_classes: int | None = None  # known after load()
        self.class_names: list[str] | None = None

    def load(self) -> Dataset:
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.source.root={str(root)!r} is not a folder; point it at a folder of images")
        files = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in self.extensions and p.is_file() and not _hidden(p, root)
        )
        if not files:
            raise DataError(
                f"no images in data.source.root={str(root)!r} (looked recursively for {', '.join(self.extensions)})"
            )
        if self.verify:
            for path in files:
                open_image(path)
        return _FolderImages(files, self._labels(files, root))

    def _labels(self, files: list[Path], root: Path) -> torch.Tensor | None:
        self.num_classes, self.class_names = None, None
        parts = [p.relative_to(root).parts for p in files]
        in_root = sum(len(part) == 1 for part in parts)
        if in_root:
            if in_root < len(files):
                log.warning("%d of %d images lie directly in data.source.root=%r, the rest in subfolders: no class "
                            "labels. For labels (one subfolder per class), move those images into a class subfolder",
                            in_root, len(files), str(root))
            return None
        self.class_names = sorted({part[0] for part in parts})
        index = {name: i for i, name in enumerate(self.class_names)}
        self.num_classes = len(self.class_names)
        return torch.tensor([index[part[0]] for part in parts], dtype=torch.int64)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def open_image(path: os.PathLike | str) -> Image.Image:
    """Open and decode an image file, or raise a :class:`DataError` naming it."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read image {str(path)!r}: {error}. Remove or replace the file.") from error


class _FolderImages(Dataset):
    def __init__(self, files: list[Path], labels: torch.Tensor | None = None) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Image.Image:
        return open_image(self.files[index])
