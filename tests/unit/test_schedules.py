"""Beta schedules against their closed forms."""

import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion import make_betas, rescale_zero_terminal_snr


def test_linear_matches_ho_and_cumprod():
    betas = make_betas("linear", 1000)
    reference = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # diffusion_tf get_beta_schedule('linear')
    np.testing.assert_allclose(betas.numpy(), reference, rtol=0, atol=1e-15)
    alphas_cumprod = np.cumprod(1 - reference)
    # alpha-bar_T of Ho's schedule is ~4.04e-5: the last x_T is almost pure noise.
    assert alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)


def test_quadratic_and_sigmoid_endpoints():
    quad = make_betas("quadratic", 100, beta_start=1e-4, beta_end=0.02)
    assert quad[0].item() == pytest.approx(1e-4) and quad[-1].item() == pytest.approx(0.02)
    assert torch.allclose(quad.sqrt().diff(), torch.full((99,), (0.02**0.5 - 1e-2) / 99, dtype=torch.float64))
    sig = make_betas("sigmoid", 101)
    # sigmoid(0) = 1/2 at the middle step
    assert sig[50].item() == pytest.approx(1e-4 + 0.5 * (0.02 - 1e-4))
    assert (sig.diff() > 0).all()


def test_cosine_alphas_cumprod_follows_closed_form():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 250, 500, 900):  # before the max_beta clip takes over
        assert alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # the clip at the end


def test_zero_terminal_snr_rescale():
    betas = make_betas("linear", 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    before, after = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert after[-1].item() == 0.0 and rescaled[-1].item() == pytest.approx(1.0)
    assert after[0].item() == pytest.approx(before[0].item(), rel=1e-12)
    # sqrt(alpha-bar) is an affine map of the original (Lin et al. Algorithm 1)
    a, b = before.sqrt(), after.sqrt()
    scale = (b[0] - b[-1]) / (a[0] - a[-1])
    assert torch.allclose(b, (a - a[-1]) * scale, atol=1e-12)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="allowed values: linear, cosine, quadratic, sigmoid"):
        make_betas("cosin", 10)
