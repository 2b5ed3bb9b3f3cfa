"""``evaluate(...)``: sample a set of images by (seed, index), extract features, score them against a reference."""

from __future__ import annotations

import platform
import time
from typing import Any, Sequence

import torch
from torch import nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.metrics.fidelity import MetricsConfig, compute_metrics, extract
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import to_uint8


@torch.no_grad()
def generate_features(net: nn.Module, diffusion: GaussianDiffusion, sampler: Sampler, indices: Sequence[int],
                      extractor: Any, seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
                      progress: Any = None, keep_images: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, logits, first ``keep_images`` images) of the images with these indices, in index order.

    Image i depends only on (seed, i), whatever ``batch_size`` or the process that draws it.
    """
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    indices = list(indices)
    feats, logits, kept = [], [], []
    was_training = net.training
    net.eval()
    try:
        for first in range(0, len(indices), batch_size):
            chunk = indices[first:first + batch_size]
            images = sampler.sample(net, diffusion, (len(chunk), *shape), seed=seed, indices=chunk, device=device)
            uint8 = to_uint8(images)
            f, lg = extract(extractor, [uint8], device)
            feats.append(f)
            logits.append(lg)
            if sum(len(k) for k in kept) < keep_images:
                kept.append(images.cpu())
            if progress is not None:
                progress(len(chunk))
    finally:
        net.train(was_training)
    images_kept = torch.cat(kept)[:keep_images] if kept else torch.empty(0)
    return torch.cat(feats), torch.cat(logits), images_kept


def library_versions() -> dict[str, str]:
    import lightning
    import torch_fidelity

    import diffusion_lab

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "torch_fidelity": torch_fidelity.__version__, "diffusion_lab": diffusion_lab.__version__}


def evaluate(net: nn.Module, diffusion: GaussianDiffusion, sampler: Sampler, num_samples: int, reference: dict,
             extractor: Any, metrics: MetricsConfig = MetricsConfig(), seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: Any = None) -> dict[str, Any]:
    """One evaluation cell: exactly ``num_samples`` images, scored; the record says how to reproduce it."""
    start = time.perf_counter()
    features, logits, _ = generate_features(net, diffusion, sampler, range(num_samples), extractor, seed, batch_size,
                                            device, progress)
    assert len(features) == num_samples, f"{len(features)} features for {num_samples} samples"
    scores = compute_metrics(features, logits, reference, metrics)
    return {
        "sampler": sampler.config(), "nfe": len(sampler.visited(diffusion)), "num_samples": num_samples,
        "seed": seed, "metrics": scores, "extractor": extractor.get_name(),
        "reference": {k: reference.get(k) for k in ("key", "num_images", "path")},
        "seconds": round(time.perf_counter() - start, 3), "versions": library_versions(),
    }
