"""Timestep lists and the DDPM / DDIM samplers on a closed-form eps-predictor.

For data that is a single point c, the optimal eps-predictor is known exactly:
eps*(x_t, t) = (x_t - sqrt(alpha-bar_t) c) / sqrt(1 - alpha-bar_t). With it every sampler must return c.
For data N(mu, s^2 I): eps*(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = alpha-bar_t.
"""

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler, Noise, slerp, timesteps


def test_spacings():
    assert timesteps(1000, 10, "uniform") == list(range(900, -1, -100))
    assert timesteps(1000, 10, "leading") == timesteps(1000, 10, "uniform")
    assert timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timesteps(1000, 4, "linspace") == [999, 666, 333, 0]
    quad = timesteps(1000, 10, "quadratic")
    assert quad == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]  # int(x^2), x = linspace(0, sqrt(800), 10)
    # S = 100: the DDIM code's list (int truncation) repeats small timesteps; each is kept once
    ddim_code = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), 100) ** 2]
    assert timesteps(1000, 100, "quadratic") == sorted(set(ddim_code), reverse=True)
    assert len(timesteps(1000, 100, "quadratic")) == 96
    assert timesteps(1000, 1000, "uniform") == list(range(999, -1, -1))
    assert timesteps(1000, 1, "uniform") == [0] and timesteps(1000, 1, "trailing") == [999]
    d = GaussianDiffusion(1000)
    logsnr = timesteps(1000, 10, "logsnr", d.alphas_cumprod)
    assert logsnr[0] == 999 and logsnr[-1] == 0 and len(logsnr) == 10
    lam = 0.5 * (d.alphas_cumprod / (1 - d.alphas_cumprod)).log()
    gaps = (lam[logsnr[1:]] - lam[logsnr[:-1]]).numpy()
    assert gaps.std() / gaps.mean() < 0.05  # evenly spaced in log-SNR up to rounding to integer t


def test_spacing_edges_are_refused_clearly():
    with pytest.raises(ValueError, match="exceeds the 1000 timesteps"):
        timesteps(1000, 1001)
    with pytest.raises(ValueError, match="allowed values: uniform, leading, quadratic, trailing, linspace, logsnr"):
        timesteps(1000, 10, "even")


def gaussian_eps(diffusion, mu, s):
    def net(x, t):
        a = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return net


@pytest.mark.parametrize("num_steps", [10, 100])
def test_ddim_eta0_returns_the_single_data_point(num_steps):
    d = GaussianDiffusion(1000)
    c = 0.37
    net = gaussian_eps(d, c, 0.0)
    x = DDIMSampler(num_steps=num_steps, eta=0.0, clip_denoised=False).sample(
        net, d, (64, 1, 2, 2), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(x, torch.full_like(x, c), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "sampler, std_tol",
    [
        (DDPMSampler(num_steps=1000, variance="fixed_small", clip_denoised=False), 0.02),
        (DDPMSampler(num_steps=1000, variance="fixed_large", clip_denoised=False), 0.02),
        (DDIMSampler(num_steps=1000, eta=0.0, clip_denoised=False), 0.02),
        (DDIMSampler(num_steps=100, eta=0.0, clip_denoised=False), 0.03),
        (DDIMSampler(num_steps=100, eta=1.0, clip_denoised=False), 0.03),
    ],
    ids=["ddpm-small", "ddpm-large", "ddim-1000", "ddim-100", "ddim-eta1-100"],
)
def test_samplers_recover_a_gaussian_data_distribution(sampler, std_tol):
    d = GaussianDiffusion(1000)
    mu, s = 0.3, 0.5
    x = sampler.sample(gaussian_eps(d, mu, s), d, (4000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    # 4000 draws: standard error 0.008 for the mean and 0.006 for the std. DDIM's discretisation shrinks the
    # std as steps get fewer (measured: 0.483 at S = 100, 0.469 at 50, 0.372 at 10), hence a wider std_tol.
    assert x.mean().item() == pytest.approx(mu, abs=0.025)
    assert x.std().item() == pytest.approx(s, abs=std_tol)


def test_ddpm_full_chain_step_is_hos_algorithm_2():
    """One step at t with all T steps equals mu-tilde(x_t, x0_hat) + sqrt(beta_t) z (fixed_large)."""
    d = GaussianDiffusion(1000)
    g2 = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    net = gaussian_eps(d, 0.1, 0.4)
    t = 500
    noise = Noise(x.shape, x.device, generator=torch.Generator().manual_seed(3))
    got = DDPMSampler(num_steps=1000, clip_denoised=False).step(Denoiser(net, d), x, t, t - 1, noise)
    tt = torch.full((5,), t)
    x0 = d.x0_from_eps(x, tt, net(x, tt))
    mean, _, _ = d.q_posterior(x0, x, tt)
    expected = mean + d.betas[t].sqrt().float() * torch.randn(x.shape, generator=g2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_same_generator_seed_same_samples():
    d = GaussianDiffusion(100)
    net = gaussian_eps(d, 0.0, 1.0)
    a = DDPMSampler(num_steps=20).sample(net, d, (3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    b = DDPMSampler(num_steps=20).sample(net, d, (3, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("num_steps, tol", [(10, 0.025), (20, 0.015)])
def test_dpm_solver_recovers_a_gaussian_in_few_steps(num_steps, tol):
    d = GaussianDiffusion(1000)
    mu, s = 0.3, 0.5
    x = DPMSolverSampler(num_steps=num_steps, clip_denoised=False).sample(
        gaussian_eps(d, mu, s), d, (4000, 1, 1, 1), generator=torch.Generator().manual_seed(0)
    )
    assert x.mean().item() == pytest.approx(mu, abs=0.025)
    # second order on log-SNR steps: measured 0.512 at 10 NFE and 0.504 at 20, closer than DDIM at 100 (0.483)
    assert x.std().item() == pytest.approx(s, abs=tol)


def test_dpm_solver_beats_ddim_at_equal_nfe():
    d = GaussianDiffusion(1000)
    net, g = gaussian_eps(d, 0.3, 0.5), lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ddim = DDIMSampler(num_steps=10, spacing="logsnr", clip_denoised=False).sample(net, d, (4000, 1, 1, 1), generator=g())
    dpm = DPMSolverSampler(num_steps=10, clip_denoised=False).sample(net, d, (4000, 1, 1, 1), generator=g())
    assert abs(dpm.std().item() - 0.5) < abs(ddim.std().item() - 0.5) / 2


def test_ddim_inversion_round_trip():
    """x0 -> x_T -> x0 along the eta = 0 ODE returns the start (Gaussian data, closed-form eps).

    Inversion evaluates eps one step behind, a first-order error: measured max error 0.046 at S = 200 and
    0.0094 at S = 1000, shrinking like 1/S.
    """
    d = GaussianDiffusion(1000)
    net = gaussian_eps(d, 0.3, 0.5)
    x0 = 0.3 + 0.5 * torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    errors = {}
    for num_steps in (200, 1000):
        sampler = DDIMSampler(num_steps=num_steps, clip_denoised=False)
        x_T = sampler.invert(net, d, x0)
        assert x_T.std().item() == pytest.approx(1.0, abs=0.1)  # latents look like N(0, I)
        errors[num_steps] = (sampler.sample(net, d, x0.shape, x_T=x_T) - x0).abs().max().item()
    assert errors[1000] < 0.015
    assert 3.5 < errors[200] / errors[1000] < 6.5  # first order in the step size


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, atol=1e-5, rtol=1e-5)
    mid = slerp(z0, z1, 0.5)
    # orthogonal-ish high-dimensional Gaussians: the midpoint keeps their norm (a lerp would shrink it by ~1/sqrt 2)
    assert mid.flatten(1).norm(dim=1).div(z0.flatten(1).norm(dim=1)).sub(1).abs().max() < 0.05


@pytest.mark.parametrize("sampler", [DDPMSampler(num_steps=10), DDIMSampler(num_steps=10, eta=0.5),
                                     DPMSolverSampler(num_steps=5)], ids=["ddpm", "ddim", "dpm_solver"])
def test_seeded_images_do_not_depend_on_batching(sampler):
    d = GaussianDiffusion(100)
    net = gaussian_eps(d, 0.0, 0.7)
    whole = sampler.sample(net, d, (32, 1, 2, 2), seed=1234)
    parts = [sampler.sample(net, d, (len(idx), 1, 2, 2), seed=1234, indices=idx)
             for idx in (list(range(i, min(i + 7, 32))) for i in range(0, 32, 7))]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)
    assert not torch.allclose(whole, sampler.sample(net, d, (32, 1, 2, 2), seed=1235))
    assert torch.equal(whole, sampler.sample(net, d, (32, 1, 2, 2), seed=1234))


def test_sampler_config_is_its_fields():
    assert DDIMSampler(num_steps=20, eta=0.2).config() == {
        "name": "ddim", "num_steps": 20, "spacing": "uniform", "clip_denoised": False, "eta": 0.2,
        "use_clipped_model_output": False,
    }
