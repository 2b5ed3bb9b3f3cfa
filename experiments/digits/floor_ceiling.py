"""The numbers that make a digits FID/IS readable, with the same extractor and code as every evaluation.

    python experiments/digits/floor_ceiling.py

Floor: real digits scored against real digits (two disjoint halves; and 1,000 real digits against all 1,797,
which overlap and so give a lower bound). Ceiling: uniform noise. IS of the real digits is the most a model
can expect (ten classes, confidently recognised).
"""

from __future__ import annotations

import torch

from diffusion_lab.data.sources import DigitsSource
from diffusion_lab.metrics import MetricsConfig, compute_metrics, extract, reference_from_features
from diffusion_lab.metrics.extractors import make_extractor
from diffusion_lab.utils.images import to_uint8


def main() -> None:
    extractor = make_extractor("digits-classifier")
    digits = DigitsSource().load().images * 2 - 1  # (1797, 1, 8, 8) in [-1, 1], as the model sees them
    features, logits = extract(extractor, [to_uint8(digits)])
    config = MetricsConfig(kid=False)
    perm = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    rows = {
        "real digits, all 1,797 (IS only)": compute_metrics(features, logits, reference_from_features(features), config),
        "real half (898) vs the other half (899)": compute_metrics(features[a], logits[a], reference_from_features(features[b]), config),
        "1,000 real vs all 1,797 (overlapping: a lower bound)": compute_metrics(
            features[perm[:1000]], logits[perm[:1000]], reference_from_features(features), config),
    }
    noise = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fn, ln = extract(extractor, [to_uint8(noise)])
    rows["1,000 uniform-noise images vs all 1,797"] = compute_metrics(fn, ln, reference_from_features(features), config)
    print(f"digits-classifier (held-out accuracy {extractor.accuracy:.4f})")
    print("| set | FID | IS |\n|---|---|---|")
    for name, m in rows.items():
        fid = "-" if name.startswith("real digits, all") else f"{m['fid']:.2f}"
        print(f"| {name} | {fid} | {m['is']:.2f} |")


if __name__ == "__main__":
    main()
