"""``evaluate(...)``: sample a set of images by (seed, index), extract features, score them against a reference.

On N processes each rank draws the indices ``rank, rank + N, ...`` (:func:`shard`) and the features are put
back in index order (:func:`gather_in_index_order`), so the scores do not depend on N: image i depends only on
(seed, i). The training callback and ``diffusion-lab-eval`` share these two functions.
"""

from __future__ import annotations

import platform
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from diffusion_lab.diffusion.denoiser import Condition, net_contract, uniform_labels
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.metrics.fidelity import MetricsConfig, class_accuracy, compute_metrics, extract
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import to_uint8


@torch.no_grad()
def generate_features(net: nn.Module, diffusion: GaussianDiffusion, sampler: Sampler, indices: Sequence[int],
                      extractor: Any, seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu",
                      progress: Any = None, keep_images: int = 0,
                      guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, logits, first ``keep_images`` images) of the images with these indices, in index order.

    Image i depends only on (seed, i), whatever ``batch_size`` or the process that draws it. A class-conditional
    net draws image i of class ``i mod num_classes`` (:meth:`Condition.for_indices`: every class equally often)
    at ``guidance_scale``.
    """
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    indices = list(indices)
    feats, logits, kept = [], [], []
    was_training = net.training
    net.eval()
    try:
        for first in range(0, len(indices), batch_size):
            chunk = indices[first:first + batch_size]
            cond = Condition.for_indices(net, chunk, guidance_scale)
            images = sampler.sample(net, diffusion, (len(chunk), *shape), seed=seed, indices=chunk, device=device,
                                    cond=cond)
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


def shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The image indices rank ``rank`` of ``world_size`` draws: rank, rank + W, rank + 2W, ..."""
    return list(range(rank, num_samples, world_size))


def gather_in_index_order(all_gather: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_samples: int,
                          world_size: int) -> torch.Tensor:
    """Every rank's rows of ``x`` (rank r holds the rows of :func:`shard`), gathered in global index order.

    ``all_gather`` is the engine's (``LightningModule.all_gather`` or ``Fabric.all_gather``): a tensor of the
    same shape from every rank -> (W, *shape). Shorter shards are padded to one shape and the padding cut off.
    """
    if world_size == 1:
        return x
    size = -(-num_samples // world_size)
    padded = torch.cat([x, x.new_zeros(size - len(x), *x.shape[1:])])
    gathered = all_gather(padded).cpu()  # (W, size, D): row k of rank r is index k * W + r
    return gathered.transpose(0, 1).reshape(world_size * size, *x.shape[1:])[:num_samples]


def library_versions() -> dict[str, str]:
    import lightning
    import torch_fidelity

    import diffusion_lab

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "torch_fidelity": torch_fidelity.__version__, "diffusion_lab": diffusion_lab.__version__}


def evaluate(net: nn.Module, diffusion: GaussianDiffusion, sampler: Sampler, num_samples: int, reference: dict | None,
             extractor: Any, metrics: MetricsConfig = MetricsConfig(), seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: Any = None, rank: int = 0, world_size: int = 1,
             all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None, guidance_scale: float = 1.0,
             accuracy: bool = False) -> dict[str, Any] | None:
    """One evaluation cell: exactly ``num_samples`` images, scored; the record says how to reproduce it.

    A class-conditional net draws image i of class ``i mod K`` at ``guidance_scale``; with ``accuracy`` (the
    extractor's logits classify the data's classes: ``CLASSIFIES``) the cell also reports ``class_accuracy``.

    On several processes every rank calls this with its ``rank``, the ``world_size`` and the engine's
    ``all_gather``; rank 0 scores (only it needs ``reference``) and returns the record, the others None.
    """
    start = time.perf_counter()
    indices = shard(num_samples, rank, world_size)
    features, logits, _ = generate_features(net, diffusion, sampler, indices, extractor, seed, batch_size,
                                            device, progress, guidance_scale=guidance_scale)
    if world_size > 1:
        assert all_gather is not None, "all_gather is needed on more than one process"
        features = gather_in_index_order(all_gather, features.to(device), num_samples, world_size).double()
        logits = gather_in_index_order(all_gather, logits.to(device), num_samples, world_size).double()
    if rank != 0:
        return None
    assert len(features) == num_samples, f"{len(features)} features for {num_samples} samples"
    scores = compute_metrics(features, logits, reference, metrics)
    num_classes = net_contract(net)["num_classes"]
    if num_classes is not None and accuracy:
        scores["class_accuracy"] = class_accuracy(logits, uniform_labels(range(num_samples), num_classes))
    # a guided cell (w != 1) runs both branches in one batched forward: the same NFE at twice the batch
    conditioning = {} if num_classes is None else {
        "guidance_scale": float(guidance_scale), "class_labels": f"uniform: image i is drawn for class i mod {num_classes}"}
    return {
        "sampler": sampler.config(), "label": sampler.label(), **conditioning, "nfe": len(sampler.visited(diffusion)), "num_samples": num_samples,
        "seed": seed, "metrics": scores, "extractor": extractor.get_name(),
        "reference": {k: reference.get(k) for k in ("key", "num_images", "path")},
        "seconds": round(time.perf_counter() - start, 3), "versions": library_versions(),
    }
