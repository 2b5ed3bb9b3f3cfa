"""FID / IS / KID against float64 numpy/scipy oracles and closed forms; the digits feature extractor."""

import numpy as np
import pytest
import scipy.linalg
import torch

from diffusion_lab.metrics import MetricsConfig, compute_metrics, reference_from_features


def oracle_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def oracle_kid_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al.)."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fid_of_a_set_against_itself_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fid = compute_metrics(x, x, reference_from_features(x), MetricsConfig(isc=False))["fid"]
    assert abs(fid) < 1e-6


def test_fid_and_kid_match_numpy_scipy_oracles():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 12, generator=g, dtype=torch.float64)
    b = (torch.randn(400, 12, generator=g, dtype=torch.float64) * 1.3 + 0.4) @ torch.eye(12, dtype=torch.float64).roll(1, 0)
    config = MetricsConfig(isc=False, kid=True, kid_subsets=1, kid_subset_size=400)  # one subset = every sample
    got = compute_metrics(a, a, reference_from_features(b), config)
    assert got["fid"] == pytest.approx(oracle_fid(a.numpy(), b.numpy()), rel=1e-8)
    assert got["kid"] == pytest.approx(oracle_kid_unbiased(a.numpy(), b.numpy()), rel=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_inception_score_of_one_hot_logits_over_k_classes_is_k(k):
    labels = torch.arange(k).repeat(50)
    logits = torch.nn.functional.one_hot(labels, 10).double() * 100  # confident and balanced
    got = compute_metrics(logits, logits, {}, MetricsConfig(fid=False, isc_splits=1))
    assert got["is"] == pytest.approx(k, rel=1e-9)


@pytest.fixture(scope="module")
def digits_features():
    from diffusion_lab.data import DiffusionDataModule, DigitsSource
    from diffusion_lab.metrics import extract, make_extractor
    from diffusion_lab.utils.images import to_uint8

    dm = DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=64)
    dm.setup()
    x = torch.stack([dm.train_set[i] for i in range(len(dm.train_set))])
    extractor = make_extractor("digits-classifier")
    return extractor, extract(extractor, [to_uint8(x)])


def test_digits_classifier_is_accurate_and_full_rank(digits_features):
    extractor, (features, logits) = digits_features
    assert extractor.accuracy >= 0.97  # held-out 20% of the digits
    print(f"digits classifier held-out accuracy: {extractor.accuracy:.4f}")
    assert features.shape == (1797, 64) and logits.shape == (1797, 10)
    assert torch.linalg.matrix_rank(torch.cov(features.T)).item() == 64


def test_digits_floor_and_ceiling(digits_features):
    """What makes a model's number readable: real halves score low, uniform noise high."""
    extractor, (features, logits) = digits_features
    from diffusion_lab.metrics import extract
    from diffusion_lab.utils.images import to_uint8

    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    a, b = perm[:898], perm[898:]
    halves = compute_metrics(features[a], logits[a], reference_from_features(features[b]), MetricsConfig())
    noise = torch.rand(1797, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fn, ln = extract(extractor, [to_uint8(noise)])
    ceiling = compute_metrics(fn, ln, reference_from_features(features), MetricsConfig())
    real_is = compute_metrics(features, logits, reference_from_features(features), MetricsConfig())["is"]
    print(f"digits: IS of the real data {real_is:.2f}; FID halves {halves['fid']:.2f}; FID noise {ceiling['fid']:.1f}")
    assert real_is > 8.5  # ten classes, confidently recognised
    assert halves["fid"] < 15 and ceiling["fid"] > 200 and ceiling["is"] < 3
