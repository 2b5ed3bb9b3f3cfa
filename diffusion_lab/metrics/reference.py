"""Reference statistics of a real data set, computed once per (data set, split, resolution, extractor) and
cached on disk with those keys both in the file name and inside the file; a mismatch is an error."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from diffusion_lab.metrics.extractors import make_extractor
from diffusion_lab.metrics.fidelity import extract, statistics
from diffusion_lab.utils.images import to_uint8

FORMAT_VERSION = 1


class ReferenceMismatchError(ValueError):
    """A cached reference file whose keys differ from the ones asked for."""


def reference_key(dataset: str, split: str, resolution: int, extractor: str) -> dict[str, Any]:
    return {"dataset": dataset, "split": split, "resolution": int(resolution), "extractor": extractor,
            "version": FORMAT_VERSION}


def reference_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", str(s))  # noqa: E731
    name = f"{slug(key['dataset'])}-{slug(key['split'])}-{key['resolution']}px-{slug(key['extractor'])}.pt"
    return Path(cache_dir) / name


def load_reference(path: Path, key: dict[str, Any], need_features: bool = False) -> dict | None:
    """The cached statistics, None when absent; raises on a stale or mismatched file."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    found = saved.get("key")
    if found != key:
        raise ReferenceMismatchError(
            f"reference statistics {path} were computed for {found}, not {key}; delete the file or rebuild with "
            "build_reference=true"
        )
    if need_features and saved.get("features") is None:
        return None
    return saved


def reference_from_features(features: torch.Tensor, keep_features: int | None = None) -> dict[str, Any]:
    """A reference of a feature set: float64 mu and sigma of all of it, and (for KID) the features themselves,
    a fixed random subset of ``keep_features`` when there are more."""
    stats = statistics(features)
    keep = features
    if keep_features is not None and len(features) > keep_features:
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:keep_features]
        keep = features[order]
    return {"num_images": len(features), "mu": torch.from_numpy(stats["mu"]),
            "sigma": torch.from_numpy(stats["sigma"]), "features": keep}


def build_reference(datamodule: Any, key: dict[str, Any], path: Path, extractor_name: str,
                    inception_weights: str | None = None, keep_features: int = 10_000, device: str = "cpu",
                    batch_size: int = 256) -> dict:
    """Extract features of every image of ``datamodule``'s training set (no flips) and cache the statistics."""
    datamodule.setup("fit")
    dataset = datamodule.train_set
    flip = dataset.transform.hflip
    dataset.transform.hflip = False  # reference statistics are of the data, not of augmentations
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=datamodule.num_workers)
        extractor = make_extractor(extractor_name, inception_weights)
        features, logits = extract(extractor, (to_uint8(batch) for batch in loader), device)
    finally:
        dataset.transform.hflip = flip
    saved = {"key": key, **reference_from_features(features, keep_features)}
    saved["features"] = saved["features"].float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
    return saved


def get_reference(datamodule: Any, dataset_name: str, split: str, extractor_name: str, cache_dir: str | Path,
                  need_features: bool = False, rebuild: bool = False, **kwargs: Any) -> dict:
    """Cached statistics for this data set and extractor, built on first use."""
    key = reference_key(dataset_name, split, datamodule.image_shape[-1], extractor_name)
    path = reference_path(cache_dir, key)
    saved = None if rebuild else load_reference(path, key, need_features)
    if saved is None:
        saved = build_reference(datamodule, key, path, extractor_name, **kwargs)
    saved["path"] = str(path)
    return saved

