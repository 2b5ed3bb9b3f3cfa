"""The forward process, parameterisation conversions, posterior and loss against closed forms."""

import pytest
import torch

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.losses import SimpleLoss, objective_for
from diffusion_lab.diffusion import GaussianDiffusion


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(1000, "linear")


def test_buffers_move_with_module_and_are_saved(diffusion):
    state = diffusion.state_dict()
    assert {"betas", "alphas_cumprod", "posterior_variance"} <= set(state)
    assert diffusion.betas.dtype == torch.float64


@pytest.mark.parametrize("t", [0, 100, 999])
def test_q_sample_mean_and_variance_over_many_draws(diffusion, t):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7)
    tt = torch.full((n,), t, dtype=torch.long)
    x_t = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
    abar = diffusion.alphas_cumprod[t].item()
    # 5 standard errors of the sample mean / variance
    assert x_t.mean().item() == pytest.approx(abar**0.5 * 0.7, abs=5 * ((1 - abar) / n) ** 0.5 + 1e-7)
    assert x_t.var().item() == pytest.approx(1 - abar, abs=5 * (1 - abar) * (2 / n) ** 0.5 + 1e-9)
    mean, var = diffusion.q_mean_variance(x0[:1], tt[:1])
    assert mean.item() == pytest.approx(abar**0.5 * 0.7) and var.item() == pytest.approx(1 - abar)


def test_eps_x0_v_round_trips(diffusion):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.x0_from_eps(x_t, t, eps), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(diffusion.eps_from_x0(x_t, t, x0), eps, atol=2e-4, rtol=1e-4)
    v = diffusion.v_from_x0_eps(x0, t, eps)
    torch.testing.assert_close(diffusion.x0_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.eps_from_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    for prediction_type, output in (("eps", eps), ("x0", x0), ("v", v)):
        d = GaussianDiffusion(1000, "linear", prediction_type=prediction_type)
        prediction = Denoiser(lambda x, tt: output, d)(x_t, t)
        got_x0, got_eps = prediction.x0, prediction.eps
        torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got_eps, eps, atol=2e-4, rtol=1e-4)


def test_posterior_equals_gaussian_conditioning(diffusion):
    """q(x_{t-1} | x_t, x_0) derived independently by conditioning the joint Gaussian of (x_{t-1}, x_t) | x_0."""
    ac = diffusion.alphas_cumprod
    for t in (1, 5, 500, 999):
        a_prev, a_t, alpha = ac[t - 1], ac[t], 1 - diffusion.betas[t]
        cov = alpha.sqrt() * (1 - a_prev)  # Cov(x_{t-1}, x_t | x_0)
        cond_var = (1 - a_prev) - cov**2 / (1 - a_t)
        x0, x_t = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.8]], dtype=torch.float64)
        cond_mean = a_prev.sqrt() * x0 + cov / (1 - a_t) * (x_t - a_t.sqrt() * x0)
        mean, var, log_var = diffusion.q_posterior(x0, x_t, torch.tensor([t]))
        assert mean.item() == pytest.approx(cond_mean.item(), rel=1e-10)
        assert var.item() == pytest.approx(cond_var.item(), rel=1e-9)
        # beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) * beta_t
        assert var.item() == pytest.approx(((1 - a_prev) / (1 - a_t) * diffusion.betas[t]).item(), rel=1e-12)
        assert log_var.exp().item() == pytest.approx(var.item(), rel=1e-9)


def test_variances_at_t0_are_clipped_like_the_original(diffusion):
    t0 = torch.tensor([0])
    x = torch.zeros(1, 1, dtype=torch.float64)
    assert diffusion.posterior_variance[0].item() == 0.0
    assert diffusion.reverse_log_variance(t0, x, "fixed_small").item() == pytest.approx(
        diffusion.posterior_variance[1].log().item()
    )
    t5 = torch.tensor([5])
    assert diffusion.reverse_log_variance(t5, x, "fixed_large").item() == pytest.approx(
        diffusion.betas[5].log().item()
    )
    with pytest.raises(ValueError, match="fixed_large, fixed_small"):
        diffusion.reverse_log_variance(t5, x, "learned")


def test_loss_of_a_zero_predictor_is_the_target_second_moment():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((4096, 1, 2, 2), 0.5)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    eps, x0_type = GaussianDiffusion(1000, prediction_type="eps"), GaussianDiffusion(1000, prediction_type="x0")
    eps_loss, t = SimpleLoss()(Denoiser(zero, eps), x0, generator=g)
    assert eps_loss.mean().item() == pytest.approx(1.0, abs=0.03)  # E[eps^2] = 1
    assert t.min() >= 0 and t.max() < 1000
    x0_loss, _ = SimpleLoss()(Denoiser(zero, x0_type), x0, generator=g)
    assert torch.allclose(x0_loss, torch.full_like(x0_loss, 0.25))


def test_min_snr_weights():
    d = GaussianDiffusion(1000, prediction_type="eps", loss_weighting="min_snr", min_snr_gamma=5.0)
    objective = objective_for(d)
    assert objective == SimpleLoss(weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0, 999])
    # SNR = alpha-bar / (1 - alpha-bar) of Ho's linear schedule, from its betas (not the module's own snr buffer)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    snr = (alphas_cumprod / (1 - alphas_cumprod))[t]
    # low t: SNR >> 5, weight 5 / SNR; high t: SNR << 5, weight 1
    torch.testing.assert_close(objective.weight(d, t), torch.stack([5.0 / snr[0], torch.ones((), dtype=torch.float64)]).float())
    v = GaussianDiffusion(1000, prediction_type="v", loss_weighting="min_snr", min_snr_gamma=5.0)
    assert objective_for(v).weight(v, torch.tensor([999])).item() == pytest.approx((snr[1] / (snr[1] + 1)).item(), rel=1e-5)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="allowed values: eps, x0, v"):
        GaussianDiffusion(prediction_type="noise")
    with pytest.raises(ValueError, match="prediction_type=v"):
        GaussianDiffusion(zero_terminal_snr=True, prediction_type="eps")
