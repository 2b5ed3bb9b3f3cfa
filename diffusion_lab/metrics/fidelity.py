"""IS / FID / KID from features, through torch-fidelity's own formulas; feature extraction in batches.

The feature extractor sees uint8 images made the same way for generated and real sets
(:func:`diffusion_lab.utils.images.to_uint8`). Statistics are float64. FID, IS and KID are torch-fidelity's
``fid_statistics_to_metric``, ``isc_features_to_metric`` and ``kid_features_to_metric``; nothing here
re-implements them.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    fid: bool = True
    isc: bool = True
    kid: bool = False
    isc_splits: int = 10  # the papers' protocol: 10 splits
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    rng_seed: int = 2020  # torch-fidelity's default, for IS shuffling and KID subsets


@torch.no_grad()
def extract(extractor: FeatureExtractorBase, images_uint8: Iterable[torch.Tensor], device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features for FID/KID, logits for IS) of uint8 batches, both float64 on the CPU."""
    extractor = extractor.to(device).eval()
    feats, logits = [], []
    for batch in images_uint8:
        if batch.shape[1] == 1 and extractor.get_name() == "inception-v3-compat":
            batch = batch.expand(-1, 3, -1, -1)
        f, lg = extractor(batch.to(device))
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats), torch.cat(logits)


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """mu and sigma in float64."""
    x = features.double().numpy()
    return {"mu": x.mean(axis=0), "sigma": np.cov(x, rowvar=False)}


def compute_metrics(features: torch.Tensor, logits: torch.Tensor, reference: dict, config: MetricsConfig) -> dict:
    """``{"fid", "is", "is_std", "kid", "kid_std"}`` (those asked for) of a generated set against ``reference``."""
    out: dict[str, float] = {}
    if config.fid:
        ref = {k: torch.as_tensor(reference[k]).double().numpy() for k in ("mu", "sigma")}
        out["fid"] = fid_statistics_to_metric(statistics(features), ref, verbose=False)[KEY_METRIC_FID]
    if config.isc:
        isc = isc_features_to_metric(logits, splits=config.isc_splits, shuffle=True, rng_seed=config.rng_seed)
        out["is"], out["is_std"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
    if config.kid:
        real = reference.get("features")
        if real is None:
            raise ValueError("KID needs reference features; rebuild the reference statistics with metrics.kid=true")
        size = min(config.kid_subset_size, len(features), len(real))
        kid = kid_features_to_metric(features.float(), real.float(), kid_subsets=config.kid_subsets,
                                     kid_subset_size=size, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                     rng_seed=config.rng_seed, verbose=False)
        out["kid"], out["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
    return out
