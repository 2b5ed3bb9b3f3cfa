"""The quality gate (issue 17): check_gate, the pixel-space digits extractor, and the default run's bands.

The bands in conf/experiment/digits.yaml are for sampled sets of 1,000 images; here they are applied to real
digits (which must pass) and to real digits degraded in ways a model can go wrong (which must fail), so that a
band too loose to see such a change, or an extractor blind to it, fails this test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffusion_lab.metrics.extractors import digits_split, make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig, MetricsConfigError, compute_metrics, extract
from diffusion_lab.metrics.gate import QualityGateError, check_gate
from diffusion_lab.metrics.reference import reference_from_features
from diffusion_lab.utils.images import to_uint8

DIGITS_YAML = Path(__file__).resolve().parents[2] / "diffusion_lab" / "conf" / "experiment" / "digits.yaml"


def test_check_gate_passes_within_and_fails_above_missing_or_nan():
    bounds = {"val/fid": 7.0, "val/fid_ddim50": 8}
    assert check_gate({"val/fid": 7.0, "val/fid_ddim50": 3.2}, bounds) == []  # the bound itself is inside
    failures = check_gate({"val/fid": 7.01, "val/fid_ddim50": math.nan}, bounds)
    assert len(failures) == 2 and "val/fid = 7.01" in failures[0] and "val/fid_ddim50 = nan" in failures[1]
    (missing,) = check_gate({"val/fid": 1.0}, bounds)
    assert "val/fid_ddim50: not computed" in missing and "val/fid" in missing
    with pytest.raises(QualityGateError, match="'val/fid' is 'low', not a number"):
        check_gate({"val/fid": 1.0}, {"val/fid": "low"})


def _sklearn_digits() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images).float()


def test_digits_pixels_are_the_data_sets_own_0_to_16_values():
    extractor = make_extractor("digits-pixels")
    raw = _sklearn_digits()[:50]  # integers 0..16
    features, logits = extract(extractor, [to_uint8(raw.unsqueeze(1) / 16 * 2 - 1)])
    assert features.shape == (50, 64) and logits.shape == (50, 0)
    # uint8 rounding: within about half a grey level of 255, in 0-16 units
    assert (features - raw.flatten(1).double()).abs().max() < 16 / 255 * 0.51
    rgb, _ = extract(extractor, [to_uint8(raw.unsqueeze(1) / 16 * 2 - 1).expand(-1, 3, -1, -1)])
    assert torch.allclose(rgb, features, atol=1e-4)  # grey RGB images give the same pixels
    with pytest.raises(MetricsConfigError, match="IS needs a classifier's logits.*digits-classifier"):
        compute_metrics(features, logits, reference_from_features(features), MetricsConfig(fid=True, isc=True))


@pytest.fixture(scope="module")
def scored_sets():
    """FID of real and degraded digits (1,000 images) against all 1,797, with both extractors, by gate name."""
    x, _, x_test, _ = digits_split(0)
    real = torch.cat([x, x_test]) * 2 - 1
    extractors = {"": make_extractor("digits-classifier"), "_digits-pixels": make_extractor("digits-pixels")}
    refs = {k: reference_from_features(extract(e, [to_uint8(real)])[0]) for k, e in extractors.items()}
    g = torch.Generator().manual_seed(0)
    some = real[torch.randperm(len(real), generator=g)[:1000]]
    sets = {
        "real": some,
        "contrast": (some * 0.8 - 0.2).clamp(-1, 1),                # a washed-out model
        "brighter": (some + 0.1).clamp(-1, 1),                       # a biased mean, as an off sampler gives
        "speckle": (some + 0.2 * torch.randn(some.shape, generator=g)).clamp(-1, 1),  # denoising left unfinished
        "blur": F.avg_pool2d(F.pad(some, (1, 1, 1, 1), mode="replicate"), 3, 1),
    }
    out = {}
    for name, images in sets.items():
        out[name] = {}
        for suffix, extractor in extractors.items():
            features, _ = extract(extractor, [to_uint8(images)])
            scores = compute_metrics(features, None, refs[suffix], MetricsConfig(isc=False))
            out[name][f"val/fid{suffix}"] = scores["fid"]
    return out


def _bands() -> dict[str, float]:
    gate = OmegaConf.load(DIGITS_YAML).callbacks.fid.gate
    return {k: float(v) for k, v in gate.items() if k in ("val/fid", "val/fid_digits-pixels")}


def test_real_digits_pass_the_default_runs_bands(scored_sets):
    assert check_gate(scored_sets["real"], _bands()) == []
    # measured 2026-12-02: 1,000 of the real digits against all of them, a near-floor value on both scales
    assert scored_sets["real"]["val/fid"] == pytest.approx(1.36, abs=0.05)
    assert scored_sets["real"]["val/fid_digits-pixels"] == pytest.approx(4.20, abs=0.1)


@pytest.mark.parametrize("degraded", ["contrast", "brighter", "speckle", "blur"])
def test_degraded_digits_fail_the_default_runs_bands(scored_sets, degraded):
    assert check_gate(scored_sets[degraded], _bands()), scored_sets[degraded]


def test_the_pixel_extractor_sees_a_shift_the_classifier_forgives(scored_sets):
    """Why a second extractor: the classifier is built to ignore a brightness shift, pixel statistics are not."""
    bands, brighter = _bands(), scored_sets["brighter"]
    # The classifier's FID of a +0.1 brightness shift is inside its band (measured 6.67 on the 2-core Xeon VM, a
    # little less on the CI machine: the trained classifier's numerics differ by CPU; band 7.2), while the
    # pixel-space FID is almost twice its band (39.6 against 21.0): only the second extractor sees the shift.
    assert brighter["val/fid"] <= bands["val/fid"]
    assert brighter["val/fid_digits-pixels"] > 1.8 * bands["val/fid_digits-pixels"]
