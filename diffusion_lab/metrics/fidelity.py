"""IS / FID / KID / precision-recall from features, through torch-fidelity's own formulas; feature extraction.

The feature extractor sees uint8 images made the same way for generated and real sets
(:func:`diffusion_lab.utils.images.to_uint8`). Statistics are float64. FID, IS, KID and precision/recall are
torch-fidelity's ``fid_statistics_to_metric``, ``isc_features_to_metric``, ``kid_features_to_metric`` and
``prc_features_to_metric``; nothing here re-implements them.

FID's uncertainty (``fid_std``) is a bootstrap over the generated features: resample the N generated feature
vectors with replacement ``fid_bootstrap`` times (fixed seed), recompute FID against the same reference, and
report the standard deviation. Why this and not the std over disjoint seeds: it needs no extra sampling (a
50,000-sample cell costs hours; the bootstrap costs seconds of linear algebra) and it measures the noise of
*this* cell's number, the sampling noise of a finite generated set. What it does not capture: the noise of
the reference statistics (held fixed), training noise (another training seed gives another model), and the
bootstrap's own bias (duplicated samples shrink the spread of the features, so the resampled FIDs are
centred slightly above the full-set FID; only their spread is used).
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
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from diffusion_lab.errors import UserError


class MetricsConfigError(UserError, ValueError):
    """A metric that cannot be computed with this many samples (e.g. KID subsets larger than the set)."""


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    fid: bool = True
    isc: bool = True
    kid: bool = False
    isc_splits: int = 10  # the papers' protocol: 10 splits
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc: bool = False  # precision and recall (Kynkaanniemi et al. 2019), k-NN balls in feature space
    prc_neighborhood: int = 3  # the paper's and torch-fidelity's k
    fid_bootstrap: int = 0  # resamples of the generated features for fid_std; 0: no uncertainty
    rng_seed: int = 2020  # torch-fidelity's default, for IS shuffling, KID subsets and the FID bootstrap

    def __post_init__(self) -> None:
        minimum = {"isc_splits": 1, "kid_subsets": 1, "kid_subset_size": 2, "prc_neighborhood": 1, "fid_bootstrap": 0}
        for key, low in minimum.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                # kid_subset_size=0 or 1 would give KID = NaN (an unbiased MMD needs two samples per subset)
                raise MetricsConfigError(f"metrics.{key}={value!r}: needs a whole number >= {low} (default "
                                         f"{getattr(type(self), key)})")

    @property
    def needs_reference_features(self) -> bool:
        """KID and precision/recall compare against the real features themselves, not only mu and sigma."""
        return self.kid or self.prc

    def check(self, num_generated: int, num_reference_features: int | None = None) -> None:
        """Refuse, before any sampling, a KID whose subsets are larger than either set (torch-fidelity would
        quietly shrink them and the report would record a subset size that was not used)."""
        if not self.kid:
            return
        smallest = min(num_generated, num_reference_features or num_generated)
        if smallest < self.kid_subset_size:
            raise MetricsConfigError(
                f"KID with metrics.kid_subset_size={self.kid_subset_size} needs at least that many samples, but the "
                f"{'generated' if num_generated == smallest else 'reference'} set has {smallest}; set "
                f"metrics.kid_subset_size={smallest} (or less), more samples, or metrics.kid=false")


@torch.no_grad()
def extract(extractor: FeatureExtractorBase, images_uint8: Iterable[torch.Tensor], device: torch.device | str = "cpu"
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features for FID/KID, logits for IS) of uint8 batches, both float64 on the CPU. An extractor without
    logits (digits-pixels) gives (B, 0) logits."""
    extractor = extractor.to(device).eval()
    feats, logits = [], []
    for batch in images_uint8:
        if batch.shape[1] == 1 and extractor.get_name() == "inception-v3-compat":
            batch = batch.expand(-1, 3, -1, -1)
        f, *rest = extractor(batch.to(device))
        lg = rest[0] if rest else f.new_zeros(len(f), 0)
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(feats), torch.cat(logits)


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """mu and sigma in float64."""
    x = features.double().numpy()
    return {"mu": x.mean(axis=0), "sigma": np.cov(x, rowvar=False)}


def fid_bootstrap_std(features: torch.Tensor, reference_stats: dict[str, np.ndarray], resamples: int,
                      seed: int) -> float:
    """Standard deviation of FID over ``resamples`` bootstrap resamples of the generated features (see above)."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        rows = torch.randint(len(features), (len(features),), generator=generator)
        values.append(fid_statistics_to_metric(statistics(features[rows]), reference_stats, verbose=False)[KEY_METRIC_FID])
    return float(np.std(values, ddof=1))


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of samples whose classifier argmax is the class they were drawn for."""
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} logits for {len(labels)} labels")
    return float((logits.argmax(1).cpu() == labels.cpu()).double().mean())


def compute_metrics(features: torch.Tensor, logits: torch.Tensor, reference: dict, config: MetricsConfig) -> dict:
    """``{"fid", "fid_std", "is", "is_std", "kid", "kid_std", "precision", "recall"}`` (those asked for) of a
    generated set against ``reference``."""
    out: dict[str, float] = {}
    real = reference.get("features")
    if config.needs_reference_features and real is None:
        raise ValueError("KID and precision/recall need reference features; rebuild the reference statistics")
    config.check(len(features), None if real is None else len(real))
    if config.fid:
        ref = {k: torch.as_tensor(reference[k]).double().numpy() for k in ("mu", "sigma")}
        out["fid"] = fid_statistics_to_metric(statistics(features), ref, verbose=False)[KEY_METRIC_FID]
        if config.fid_bootstrap > 1:
            out["fid_std"] = fid_bootstrap_std(features, ref, config.fid_bootstrap, config.rng_seed)
    if config.isc:
        if logits.shape[1] == 0:
            raise MetricsConfigError("IS needs a classifier's logits and this feature extractor has none "
                                     "(digits-pixels); use digits-classifier, or metrics.isc=false")
        isc = isc_features_to_metric(logits, splits=config.isc_splits, shuffle=True, rng_seed=config.rng_seed)
        out["is"], out["is_std"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
    if config.kid:
        kid = kid_features_to_metric(features.float(), real.float(), kid_subsets=config.kid_subsets,
                                     kid_subset_size=config.kid_subset_size, kid_degree=3, kid_gamma=None, kid_coef0=1,
                                     rng_seed=config.rng_seed, verbose=False)
        out["kid"], out["kid_std"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
    if config.prc:
        # torch-fidelity's convention: features_1 generated, features_2 real
        prc = prc_features_to_metric(features.float(), real.float(), prc_neighborhood=config.prc_neighborhood,
                                     prc_batch_size=10000, save_cpu_ram=False, verbose=False)
        out["precision"], out["recall"] = prc[KEY_METRIC_PRECISION], prc[KEY_METRIC_RECALL]
    return out
