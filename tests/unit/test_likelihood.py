"""The variational bound against closed forms and independent computations (issue 12).

- normal_kl against torch.distributions' KL in float64;
- the discretised decoder against scipy's numerical integration of the Gaussian over each bin (edges to +-inf);
- the whole bound of Gaussian data under the exact optimal model against its expectation in closed form;
- per-image results independent of batch size and of the split of images across processes.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.losses import HybridLoss, SimpleLoss, objective_for
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from diffusion_lab.metrics.likelihood import bits_per_dim


def test_normal_kl_matches_torch_distributions_in_float64():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(500, generator=g, dtype=torch.float64), torch.randn(500, generator=g, dtype=torch.float64)
    lv1, lv2 = 3 * torch.randn(500, generator=g, dtype=torch.float64), 3 * torch.randn(500, generator=g, dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    D = torch.distributions
    theirs = D.kl_divergence(D.Normal(m1, (0.5 * lv1).exp()), D.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


@pytest.mark.parametrize("levels", [17, 256])
def test_discretized_decoder_matches_numerical_integration(levels):
    from scipy import integrate, stats

    half = 1 / (levels - 1)
    x = torch.linspace(-1, 1, levels, dtype=torch.float64)  # every level, the edge bins included
    for mean, log_scale in [(0.3, math.log(0.2)), (-0.95, math.log(0.05)), (0.99, math.log(0.5)),
                            (0.0, math.log(3 * half))]:
        ours = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale), levels)
        pdf = stats.norm(mean, math.exp(log_scale)).pdf
        checked = range(levels) if levels <= 17 else [*range(0, levels, 7), levels - 1]  # both edges always
        for k in checked:
            xk = x[k].item()
            lo = -math.inf if k == 0 else xk - half
            hi = math.inf if k == levels - 1 else xk + half
            cuts = [lo] + ([mean] if lo < mean < hi else []) + [hi]  # split at the peak: quad sees the mass
            p = sum(integrate.quad(pdf, a, b, epsabs=1e-300, epsrel=1e-11)[0] for a, b in zip(cuts, cuts[1:]))
            if p > 1e-250:
                assert ours[k].item() == pytest.approx(math.log(p), rel=1e-6, abs=1e-8), (mean, k)
        # A distribution over the levels: the bins partition the real line.
        assert ours.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_discretized_decoder_is_finite_far_in_the_tails():
    x = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(x, torch.tensor([1.0, 30.0, -1.0]), torch.log(torch.full((3,), 0.01)), 256)
    assert torch.isfinite(ll).all() and (ll < -1000).all()  # no 1e-12 floor: a bad model is scored as bad


def gaussian_optimal_model(diffusion, mu, s):
    """The exact eps-predictor for x_0 ~ N(mu, s^2) per pixel: E[eps | x_t] in closed form."""
    ab = diffusion.alphas_cumprod

    def net(x, t):
        a = ab[t].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return net


def closed_form_bound(d: GaussianDiffusion, mu: float, s: float, levels: int, variance: str) -> float:
    """E over data and noise of the bound in bits/dim for x_0 ~ N(mu, s^2) and the optimal model, float64.

    KL terms: Gaussians with the same form; the mean gap is coef1 (x_0 - E[x_0|x_t]) whose second moment is
    Var(x_0 | x_t) = s^2 (1 - a) / (a s^2 + 1 - a). Decoder: on a bin of width 2h much finer than every scale,
    -log P ~ -log N(x_0; E[x_0|x_1], sigma_1^2) - log 2h. Prior: KL of N(sqrt(a_T) x_0, 1 - a_T) from N(0, 1).
    """
    T = d.num_timesteps
    ab = d.alphas_cumprod.double()
    betas = d.betas.double()
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    var1 = betas * (1 - ab_prev) / (1 - ab)
    var2 = torch.cat([var1[1:2], betas[1:] if variance == "fixed_large" else var1[1:]])
    coef1 = betas * ab_prev.sqrt() / (1 - ab)
    var_x0 = s * s * (1 - ab) / (ab * s * s + 1 - ab)
    t = torch.arange(1, T)
    kl = 0.5 * (var2[t].log() - var1[t].log() + var1[t] / var2[t] - 1) + coef1[t] ** 2 * var_x0[t] / (2 * var2[t])
    h = 1 / (levels - 1)
    decoder = 0.5 * math.log(2 * math.pi * var2[0]) + var_x0[0] / (2 * var2[0]) - math.log(2 * h)
    a_T = ab[-1]
    prior = 0.5 * (-torch.log(1 - a_T) + (1 - a_T) + a_T * (mu * mu + s * s) - 1)
    return float((prior + decoder + kl.sum()) / math.log(2))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_bound_of_gaussian_data_under_the_optimal_model_matches_closed_form(variance):
    mu, s, levels = 0.1, 0.2, 4097  # a fine quantisation: bins 1/2048 wide, far below s
    d = GaussianDiffusion(200, variance=variance, quantization_levels=levels)
    h = 1 / (levels - 1)
    g = torch.Generator().manual_seed(0)
    x = mu + s * torch.randn(8, 1, 64, 64, generator=g, dtype=torch.float64)
    x = (((x + 1) / (2 * h)).round() * (2 * h) - 1).float()
    result = bits_per_dim(gaussian_optimal_model(d, mu, s), d, x, clip_denoised=False, seed=1)
    expected = closed_form_bound(d, mu, s, levels, variance)
    summary = result.summary()
    # Monte Carlo over 32768 pixels per term: a few standard errors of the per-image totals.
    assert summary["bpd"] == pytest.approx(expected, abs=max(4 * summary["bpd_std_err"], 0.005))
    torch.testing.assert_close(result.total, result.prior + result.terms.sum(1))
    # And the parts: the prior has no parameters, so it matches to float precision on the sample's moments.
    a_T = d.alphas_cumprod[-1].item()
    m2 = (x.double() ** 2).mean().item()
    prior = 0.5 * (-math.log(1 - a_T) + (1 - a_T) + a_T * m2 - 1) / math.log(2)
    assert summary["prior_bpd"] == pytest.approx(prior, rel=1e-6)


def test_learned_range_at_the_ends_is_the_fixed_variances():
    """v = 1 gives log beta_t, v = -1 gives log beta-tilde_t (clipped at t = 0): Improved DDPM eq. 15."""
    d = GaussianDiffusion(100, variance="learned_range")
    t = torch.arange(1, 100)
    like = torch.zeros(99, 1, 2, 2)
    ones = torch.ones_like(like)
    torch.testing.assert_close(d.reverse_log_variance(t, like, v=ones), d.betas[t].log().float().view(-1, 1, 1, 1).expand_as(like))
    torch.testing.assert_close(d.reverse_log_variance(t, like, v=-ones),
                               d.reverse_log_variance(t, like, "fixed_small").expand_as(like))


def test_per_image_terms_do_not_depend_on_batch_or_process_split():
    d = GaussianDiffusion(50, quantization_levels=17)
    net = gaussian_optimal_model(d, 0.0, 0.5)
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    whole = bits_per_dim(net, d, x, seed=7, batch_size=6)
    small = bits_per_dim(net, d, x, seed=7, batch_size=4)
    torch.testing.assert_close(whole.total, small.total, rtol=1e-6, atol=1e-9)
    # two "ranks": images 0, 2, 4 and 1, 3, 5, each with their global indices
    rank0 = bits_per_dim(net, d, x[0::2], indices=[0, 2, 4], seed=7)
    rank1 = bits_per_dim(net, d, x[1::2], indices=[1, 3, 5], seed=7)
    torch.testing.assert_close(torch.stack([rank0.total, rank1.total], 1).flatten(), whole.total, rtol=1e-6, atol=1e-9)
    other_seed = bits_per_dim(net, d, x, seed=8)
    assert not torch.allclose(other_seed.terms, whole.terms)


def test_hybrid_loss_stops_the_mean_gradient_in_the_vlb_term():
    """L_hybrid = L_simple + 0.001 T L_t: the mean channels get exactly L_simple's gradient, v gets only L_vlb's."""
    d = GaussianDiffusion(100, variance="learned_range", loss="hybrid", quantization_levels=17)
    eps_out = torch.zeros(4, 1, 4, 4, requires_grad=True)
    v_out = torch.zeros(4, 1, 4, 4, requires_grad=True)
    net = lambda x, t: torch.cat([eps_out + 0.1 * x, v_out + 0.0 * x], 1)  # noqa: E731
    x0 = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert objective_for(d) == HybridLoss()
    loss, t = HybridLoss()(Denoiser(net, d), x0, generator=torch.Generator().manual_seed(1))
    loss.sum().backward()
    g_mean, g_v = eps_out.grad.clone(), v_out.grad.clone()
    # the same draw, L_simple alone (same mean head), must give the same gradient on the mean channels
    eps_out.grad = None
    simple = GaussianDiffusion(100, quantization_levels=17)
    net_c = lambda x, t: eps_out + 0.1 * x  # noqa: E731
    simple_loss, t2 = SimpleLoss()(Denoiser(net_c, simple), x0, generator=torch.Generator().manual_seed(1))
    simple_loss.sum().backward()
    assert (t == t2).all()
    torch.testing.assert_close(g_mean, eps_out.grad)
    assert g_v.abs().sum() > 0
    # and the value: simple + 0.001 * T * vb in bits/dim
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=_after_t(x0, t)))
    vb = d.vb_terms(Denoiser(lambda x, tt: net(x, tt).detach(), d)(x_t, t), x0, x_t, t)
    torch.testing.assert_close(loss.detach(), simple_loss.detach() + 0.001 * 100 * vb)


def _after_t(x0, t):
    """The generator state the loss had after drawing t (seed 1): the next draw is its noise."""
    g = torch.Generator().manual_seed(1)
    torch.randint(0, 100, (x0.shape[0],), generator=g)
    return g


def test_configuration_errors_are_clear():
    with pytest.raises(ValueError, match="diffusion.loss=hybrid .* needs diffusion.variance=learned_range"):
        GaussianDiffusion(10, loss="hybrid")
    with pytest.raises(ValueError, match="diffusion.variance=.learned. is not allowed"):
        GaussianDiffusion(10, variance="learned")
    d = GaussianDiffusion(10, variance="learned_range")
    with pytest.raises(ValueError, match="L_simple gives it no gradient"):
        SimpleLoss()(Denoiser(lambda x, t: torch.cat([x, x], 1), d), torch.zeros(2, 1, 4, 4))
    x, t = torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="set model.net.out_channels=2"):
        Denoiser(lambda x, t: x, d)(x, t)
    with pytest.raises(ValueError, match="needs 1 channels"):
        Denoiser(lambda x, t: torch.cat([x, x], 1), GaussianDiffusion(10))(x, t)


@pytest.mark.parametrize("in_memory", [False, True])
def test_bound_images_are_the_data_in_minus_one_to_one_on_both_loading_paths(in_memory):
    """dataset_images gives the digits as the model was trained on them (x / 8 - 1 on 17 levels), unflipped.

    Regression: on the in-memory path the items were finished twice (scaled to [-1, 1], then again to [-3, 1]),
    which put a 3,000-step digits model's bound at ~37,000 bits/dim instead of a few."""
    from sklearn.datasets import load_digits

    from diffusion_lab.data import DiffusionDataModule, DigitsSource
    from diffusion_lab.metrics.likelihood import dataset_images

    dm = DiffusionDataModule(DigitsSource(), name="digits", image_size=8, channels=1, batch_size=64,
                             hflip=True, in_memory=in_memory, quantization_levels=17)
    images = dataset_images(dm, "train", 50)
    expected = torch.from_numpy(load_digits().images[:50]).float().div(8).sub(1).unsqueeze(1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)  # no flips either (hflip=True above)
