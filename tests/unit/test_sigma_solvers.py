"""iPNDM, Heun (EDM Algorithm 1) and Euler ancestral: step-by-step agreement with diffusers, and Gaussian limits.

Reference settings (diffusers 0.42, float32 schedules; this project float64, hence 1e-4 absolute per state):
- IPNDMScheduler(num_train_timesteps=1000, trained_betas=[sigma_t for our visited t] + [0]). diffusers' "betas"
  are the VP sigmas sqrt(1 - alpha-bar) and its alphas are sqrt(1 - betas^2), so the steps are exactly ours; its
  timesteps are the angles (2 / pi) atan2(sigma, alpha), mapped back to integers here. It reads a v-prediction
  (eps = sigma x + alpha v): the test passes v = (eps - sigma x) / alpha with diffusers' own sigma and alpha.
  It is always 4th order (``pndm_order`` is not read), so only order=4 is compared; order=1 is checked against DDIM.
  The largest per-state difference (5e-5, logsnr) comes from diffusers' float32 alpha = sqrt(1 - sigma^2) at t = 999.
- HeunDiscreteScheduler / EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear",
  beta_start=1e-4, beta_end=0.02, timestep_spacing="leading" | "trailing"): integer timesteps equal to ours
  (their "linspace" interpolates sigma at fractional t). Heun's defaults are beta_start=0.00085, beta_end=0.012
  (Stable Diffusion's), hence both are passed. Their state is sample = x_t / sqrt(alpha-bar_t) and the model
  input sample * scale_model_input = x_t. diffusers' Heun calls step() twice per Heun step and its timesteps
  list every evaluation (t_0, t_1, t_1, ...), which equals HeunSampler.visited(). Euler ancestral draws its
  noise from the same seeded generator in the same order; diffusers also draws on the last step, where its
  sigma_up is 0, and this project draws nothing there. Heun's clip_denoised is compared with clip_sample=True;
  EulerAncestralDiscreteScheduler has no clipping.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers import DDIMSampler, Noise
from diffusion_lab.samplers.euler_ancestral import EulerAncestralSampler
from diffusion_lab.samplers.heun import HeunSampler
from diffusion_lab.samplers.ipndm import IPNDMSampler
from tests.unit.test_diffusers_agreement import eps_model

diffusers = pytest.importorskip("diffusers")

CONF = Path(__file__).parents[2] / "diffusion_lab" / "conf" / "sampler"
MU, S = 0.3, 0.5


class Recorder:
    """The eps-model of Gaussian data, recording every state and timestep it is evaluated at."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, t):
        self.calls.append((x.clone(), int(t[0])))
        return self.net(x, t)


def start():
    return torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))


# --- agreement with diffusers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", ["trailing", "leading", "logsnr"])
def test_ipndm_matches_diffusers(spacing):
    d = GaussianDiffusion(1000)
    net, ours = eps_model(d), IPNDMSampler(num_steps=10, spacing=spacing)
    steps = ours.visited(d)
    sigmas = (1 - d.alphas_cumprod[steps]).sqrt().tolist() + [0.0]
    theirs = diffusers.IPNDMScheduler(num_train_timesteps=1000, trained_betas=sigmas)
    theirs.set_timesteps(len(steps))
    # their timesteps are angles: alpha-bar = cos^2(pi t / 2) maps them back to our integer timesteps
    abar = torch.cos(theirs.timesteps.double() * math.pi / 2) ** 2
    assert (abar[:, None] - d.alphas_cumprod[None, :]).abs().argmin(1).tolist() == steps
    recorder = Recorder(net)
    x0 = start()
    x_ours = ours.run(Denoiser(recorder, d), x0.clone(), noise=None)
    assert [t for _, t in recorder.calls] == steps
    x = x0.clone()
    for i, (t, t_theirs) in enumerate(zip(steps, theirs.timesteps)):
        torch.testing.assert_close(recorder.calls[i][0], x, atol=1e-4, rtol=0, msg=f"state at t={t}")
        eps = net(x, torch.full((4,), t))
        v = (eps - theirs.betas[i] * x) / theirs.alphas[i]
        x = theirs.step(v, t_theirs, x).prev_sample
    torch.testing.assert_close(x_ours, x, atol=1e-4, rtol=0)


def test_ipndm_order_1_is_ddim():
    d = GaussianDiffusion(1000)
    x0 = start().double()
    a = IPNDMSampler(num_steps=10, order=1).sample(eps_model(d), d, x0.shape, x_T=x0)
    b = DDIMSampler(num_steps=10, spacing="trailing").sample(eps_model(d), d, x0.shape, x_T=x0)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_ipndm_orders_differ_and_are_refused_outside_1_to_4():
    d = GaussianDiffusion(1000)
    x0 = start().double()
    outs = [IPNDMSampler(order=k).sample(eps_model(d), d, x0.shape, x_T=x0) for k in (2, 3, 4)]
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ConfigError, match="orders 1, 2, 3 and 4"):
            IPNDMSampler(order=bad)


def sigma_scheduler(cls, spacing, **kwargs):
    return cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
               timestep_spacing=spacing, **kwargs)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip", [False, True])
def test_heun_matches_diffusers(spacing, clip):
    d = GaussianDiffusion(1000)
    net, ours = eps_model(d), HeunSampler(num_steps=10, spacing=spacing, clip_denoised=clip)
    theirs = sigma_scheduler(diffusers.HeunDiscreteScheduler, spacing, clip_sample=clip)
    theirs.set_timesteps(10)
    visited = ours.visited(d)
    assert torch.equal(theirs.timesteps, theirs.timesteps.round()) and theirs.timesteps.long().tolist() == visited
    assert len(visited) == 19
    recorder = Recorder(net)
    x0 = start()
    x_ours = ours.run(Denoiser(recorder, d), x0.clone(), noise=None)
    assert [t for _, t in recorder.calls] == visited  # one entry of visited() per network evaluation
    sample = x0 / d.alphas_cumprod[visited[0]].sqrt().float()  # diffusers' state x_t / sqrt(alpha-bar_t)
    for i, t in enumerate(theirs.timesteps):
        model_input = theirs.scale_model_input(sample, t)
        torch.testing.assert_close(recorder.calls[i][0], model_input, atol=1e-4, rtol=0, msg=f"evaluation {i}")
        sample = theirs.step(net(model_input, torch.full((4,), int(t))), t, sample).prev_sample
    torch.testing.assert_close(x_ours, sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral_matches_diffusers(spacing):
    d = GaussianDiffusion(1000)
    net, ours = eps_model(d), EulerAncestralSampler(num_steps=20, spacing=spacing)
    theirs = sigma_scheduler(diffusers.EulerAncestralDiscreteScheduler, spacing)
    theirs.set_timesteps(20)
    visited = ours.visited(d)
    assert theirs.timesteps.long().tolist() == visited
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    recorder = Recorder(net)
    x0 = start()
    x_ours = ours.run(Denoiser(recorder, d), x0.clone(), Noise(x0.shape, x0.device, generator=g_ours))
    assert [t for _, t in recorder.calls] == visited
    sample = x0 / d.alphas_cumprod[visited[0]].sqrt().float()
    for i, t in enumerate(theirs.timesteps):
        model_input = theirs.scale_model_input(sample, t)
        torch.testing.assert_close(recorder.calls[i][0], model_input, atol=1e-4, rtol=0, msg=f"evaluation {i}")
        sample = theirs.step(net(model_input, torch.full((4,), int(t))), t, sample, generator=g_theirs).prev_sample
    torch.testing.assert_close(x_ours, sample, atol=1e-4, rtol=0)


def test_euler_ancestral_draws_one_noise_per_step_but_the_last_and_eta_0_is_ddim():
    d = GaussianDiffusion(1000)
    x0 = start().double()
    draws = []

    def noise():
        draws.append(torch.randn(x0.shape, generator=g, dtype=torch.float64))
        return draws[-1]

    g = torch.Generator().manual_seed(1)
    EulerAncestralSampler(num_steps=20).run(Denoiser(eps_model(d), d), x0, noise)
    assert len(draws) == 19
    euler = EulerAncestralSampler(num_steps=20, eta=0.0).sample(eps_model(d), d, x0.shape, x_T=x0)
    ddim = DDIMSampler(num_steps=20, spacing="trailing").sample(eps_model(d), d, x0.shape, x_T=x0)
    torch.testing.assert_close(euler, ddim, atol=1e-12, rtol=0)  # Euler in sigma with d = eps is DDIM's step
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="eta"):
            EulerAncestralSampler(eta=bad)


# --- Gaussian limits (float64) -----------------------------------------------------------------------------------

def gaussian_eps(diffusion, mu, s):
    """The exact eps of data N(mu, s^2), in the dtype of x (the schedule is float64)."""

    def net(x, t):
        a = diffusion.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return net


def ode_error(sampler, d):
    """Max |x_0 - exact| over 4000 float64 starts: the probability-flow ODE of N(mu, s^2) keeps
    z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) fixed, so it ends at mu + s z (z from the first visited t)."""
    x_T = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = d.alphas_cumprod[sampler.visited(d)[0]]
    exact = MU + S * (x_T - a.sqrt() * MU) / (a * S**2 + 1 - a).sqrt()
    return (sampler.sample(gaussian_eps(d, MU, S), d, x_T.shape, x_T=x_T) - exact).abs().max().item()


def test_ipndm_converges_at_high_order_and_beats_ddim_and_logsnr():
    d = GaussianDiffusion(1000)
    err = {n: ode_error(IPNDMSampler(num_steps=n), d) for n in (10, 20)}
    # measured 0.042 at 10 NFE and 0.0020 at 20 (order ~4); DDIM at 10 NFE: 0.46; iPNDM on logsnr: 0.085, 0.021
    assert err[10] < 0.05 and err[20] < 0.003
    assert err[10] / err[20] > 10
    assert err[10] < ode_error(DDIMSampler(num_steps=10, spacing="trailing"), d) / 5
    assert err[20] < ode_error(IPNDMSampler(num_steps=20, spacing="logsnr"), d) / 5


def test_heun_is_second_order_and_beats_ddim():
    d = GaussianDiffusion(1000)
    # linspace ends at t = 0, where the closing Euler step is negligible: the error falls 4x per halved step
    # (measured 0.154, 0.0345, 0.0081 at 10, 20, 40 Heun steps)
    lin = {n: ode_error(HeunSampler(num_steps=n, spacing="linspace"), d) for n in (20, 40)}
    assert 3.5 < lin[20] / lin[40] < 5
    # the default (trailing) at NFE 19 (measured 0.230) against DDIM at NFE 10 (0.461) and 19 (0.256)
    heun = ode_error(HeunSampler(num_steps=10), d)
    assert heun < ode_error(DDIMSampler(num_steps=10, spacing="trailing"), d) / 1.8
    assert heun < ode_error(DDIMSampler(num_steps=19, spacing="trailing"), d)


def euler_ancestral_moments(sampler, d):
    """Exact mean and variance of the sampler's output on N(mu, s^2) data: the map (x_T, z_1..z_n) -> x_0 is affine
    for this eps, so one batch holds the offset (all zero), the x_T coefficient and each noise draw's coefficient."""
    n = len(sampler.visited(d)) - 1
    basis = torch.zeros(n + 2, 1, 1, 1, dtype=torch.float64)
    basis[1] = 1.0
    calls = []

    def noise():
        z = torch.zeros_like(basis)
        z[2 + len(calls)] = 1.0
        calls.append(1)
        return z

    out = sampler.run(Denoiser(gaussian_eps(d, MU, S), d), basis, noise).flatten()
    assert len(calls) == n
    return out[0].item(), ((out[1:] - out[0]) ** 2).sum().item()


def test_euler_ancestral_converges_to_the_data_distribution():
    d = GaussianDiffusion(1000)
    moments = {n: euler_ancestral_moments(EulerAncestralSampler(num_steps=n), d) for n in (10, 50, 200)}
    errors = {n: abs(math.sqrt(v) - S) for n, (_, v) in moments.items()}
    # measured std errors 0.167, 0.056, 0.0174 (0.0039 at 1000): first order in the step size
    assert errors[200] < errors[50] < errors[10] and errors[200] < 0.02
    assert 2.5 < errors[50] / errors[200] < 4.5
    assert all(m == pytest.approx(MU, abs=1e-4) for m, _ in moments.values())
    # the sampled statistics agree with the exact moments (4000 draws: standard error 0.008 and 0.006)
    x = EulerAncestralSampler(num_steps=50).sample(gaussian_eps(d, MU, S), d, (4000, 1, 1, 1), seed=0)
    assert x.mean().item() == pytest.approx(moments[50][0], abs=0.025)
    assert x.std().item() == pytest.approx(math.sqrt(moments[50][1]), abs=0.02)


# --- config, yaml and NFE ---------------------------------------------------------------------------------------

SAMPLERS = [IPNDMSampler, HeunSampler, EulerAncestralSampler]


@pytest.mark.parametrize("cls", SAMPLERS, ids=lambda c: c.name)
def test_yaml_equals_the_dataclass_defaults(cls):
    cfg = OmegaConf.load(CONF / f"{cls.name}.yaml")
    assert cfg._target_ == f"{cls.__module__}.{cls.__name__}"
    built = instantiate(cfg)
    assert built == cls()  # every field of the yaml equals the default
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(cfg) - {"_target_"} == fields
    assert built.config() == {"name": cls.name, **{f: getattr(cls(), f) for f in fields - {"progress"}}}


@pytest.mark.parametrize("sampler", [IPNDMSampler(num_steps=7), IPNDMSampler(num_steps=40, spacing="logsnr"),
                                     HeunSampler(num_steps=6), HeunSampler(num_steps=1),
                                     EulerAncestralSampler(num_steps=9)],
                         ids=["ipndm-7", "ipndm-40-logsnr", "heun-6", "heun-1", "euler_ancestral-9"])
def test_visited_counts_every_network_evaluation(sampler):
    d = GaussianDiffusion(100 if sampler.num_steps < 40 else 1000)
    recorder = Recorder(gaussian_eps(d, MU, S))
    sampler.sample(recorder, d, (2, 1, 2, 2), seed=0)
    assert [t for _, t in recorder.calls] == sampler.visited(d)
    if isinstance(sampler, HeunSampler):
        assert len(recorder.calls) == 2 * sampler.num_steps - 1
