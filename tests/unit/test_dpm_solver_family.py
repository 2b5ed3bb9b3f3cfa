"""The DPM-Solver++ family: 2M (DPMSolverSampler), 3M (DPMSolver3MSampler) and SDE-2M (SDEDPMSolverSampler).

Agreement with diffusers' DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
final_sigmas_type="zero", lower_order_final=..., solver_type="midpoint" (its default), prediction_type="epsilon"):
2M = solver_order=2, algorithm_type="dpmsolver++"; 3M = solver_order=3, "dpmsolver++"; SDE = solver_order=2,
"sde-dpmsolver++". Both sides see the same closed-form eps model, the same x_T and, for the SDE, noise from
generators with the same seed drawn in the same order. Our run() and diffusers' step loop are compared by
recording the x passed to every network call (the state after every step) and the final output, to 1e-4
absolute (diffusers computes its schedule in float32, this project in float64).

Conventions and how they are mapped:
- Timesteps. diffusers' native ``trailing`` list equals ours. Its ``leading`` (ratio T // (S + 1)) and ``linspace``
  (S + 1 points, the last, t = 0, dropped) lists differ from ours (test_timestep_lists_vs_diffusers), so ``linspace``
  and the default ``logsnr`` are compared by passing our list to ``set_timesteps(timesteps=...)``: diffusers then
  reads sigma at exactly those integer timesteps, as we do. (diffusers' ``use_lu_lambdas`` is not the same thing: it
  keeps the uniform-lambda sigmas, not the sigmas of the rounded timesteps.)
- The last step goes to sigma = 0. diffusers forces it to first order (final_sigmas_type="zero"), which returns the
  x0 prediction; ours returns it directly. The SDE's last step has a zero noise coefficient: diffusers still draws
  (and multiplies by 0) one last noise tensor, we draw none, so the first S - 1 draws coincide.
- Warm-up: order 1, then 2 (then 3 for 3M); ``lower_order_final`` with fewer than 15 steps makes 3M's
  second-to-last step second order, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import diffusion_lab
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.samplers import DPMSolverSampler, Noise
from diffusion_lab.samplers.dpm_solver_3m import DPMSolver3MSampler
from diffusion_lab.samplers.sde_dpm_solver import SDEDPMSolverSampler

diffusers = pytest.importorskip("diffusers")

CONF = Path(diffusion_lab.__file__).parent / "conf" / "sampler"


def gaussian_eps(diffusion, mu, s):
    """The exact eps-predictor of data N(mu, s^2), in the input's dtype: affine in x at every t."""

    def net(x, t):
        a = diffusion.alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return net


def scheduler(solver_order, algorithm_type, steps, spacing, lower_order_final=True):
    """diffusers' scheduler set to our timestep list: natively for trailing, through ``timesteps=`` otherwise."""
    theirs = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", solver_order=solver_order, algorithm_type=algorithm_type,
        final_sigmas_type="zero", lower_order_final=lower_order_final,
        timestep_spacing="trailing" if spacing == "trailing" else "linspace")
    if spacing == "trailing":
        theirs.set_timesteps(len(steps))
    else:
        theirs.set_timesteps(timesteps=steps)
    assert theirs.timesteps.tolist() == steps
    return theirs


def run_lockstep(ours, solver_order, algorithm_type, lower_order_final=True):
    """Our run() and diffusers' step loop from the same x_T; the x of every network call and the outputs."""
    d = GaussianDiffusion(1000)
    net = gaussian_eps(d, 0.2, 0.6)
    steps = ours.visited(d)
    theirs = scheduler(solver_order, algorithm_type, steps, ours.spacing, lower_order_final)
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    seen: list[torch.Tensor] = []

    def recording(x, t):
        seen.append(x.clone())
        return net(x, t)

    noise = Noise(x_T.shape, x_T.device, generator=torch.Generator().manual_seed(5))
    out_ours = ours.run(Denoiser(recording, d), x_T.clone(), noise)

    g, x, seen_theirs = torch.Generator().manual_seed(5), x_T.clone(), []
    for t in theirs.timesteps:
        seen_theirs.append(x.clone())
        x = theirs.step(net(x, torch.full((4,), int(t))), t, x, generator=g).prev_sample
    return steps, seen, seen_theirs, out_ours, x


def assert_lockstep(steps, seen, seen_theirs, out_ours, out_theirs):
    assert len(seen) == len(seen_theirs) == len(steps)  # one network call per visited timestep (NFE)
    for t, a, b in zip(steps, seen, seen_theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"x at t={t}: {m}")
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-4, rtol=0)


CASES = [(steps, spacing) for steps in (5, 10, 20) for spacing in ("trailing", "logsnr", "linspace")]


@pytest.mark.parametrize("num_steps, spacing", CASES)
def test_dpm_solver_2m_matches_diffusers(num_steps, spacing):
    ours = DPMSolverSampler(num_steps=num_steps, spacing=spacing)
    assert_lockstep(*run_lockstep(ours, 2, "dpmsolver++"))


@pytest.mark.parametrize("num_steps, spacing", CASES)
def test_dpm_solver_3m_matches_diffusers(num_steps, spacing):
    ours = DPMSolver3MSampler(num_steps=num_steps, spacing=spacing)
    assert_lockstep(*run_lockstep(ours, 3, "dpmsolver++"))


@pytest.mark.parametrize("spacing", ["trailing", "logsnr"])
def test_dpm_solver_3m_without_lower_order_final_matches_diffusers(spacing):
    """At 10 steps lower_order_final matters (the second-to-last step is third order without it)."""
    ours = DPMSolver3MSampler(num_steps=10, spacing=spacing, lower_order_final=False)
    result = run_lockstep(ours, 3, "dpmsolver++", lower_order_final=False)
    assert_lockstep(*result)
    d = GaussianDiffusion(1000)
    lowered = DPMSolver3MSampler(num_steps=10, spacing=spacing).sample(
        gaussian_eps(d, 0.2, 0.6), d, (4, 1, 4, 4), x_T=torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert (lowered - result[3]).abs().max() > 1e-4  # the switch changed the output


@pytest.mark.parametrize("num_steps, spacing", CASES)
def test_sde_dpm_solver_matches_diffusers(num_steps, spacing):
    ours = SDEDPMSolverSampler(num_steps=num_steps, spacing=spacing)
    assert_lockstep(*run_lockstep(ours, 2, "sde-dpmsolver++"))


def test_timestep_lists_vs_diffusers():
    """trailing coincides with diffusers' list; its leading and linspace do not (hence timesteps= above)."""
    d = GaussianDiffusion(1000)
    for spacing, equal in [("trailing", True), ("leading", False), ("linspace", False)]:
        theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                       timestep_spacing=spacing)
        theirs.set_timesteps(10)
        assert (theirs.timesteps.tolist() == DPMSolverSampler(num_steps=10, spacing=spacing).visited(d)) is equal


def test_sde_draws_one_noise_per_step_but_the_last():
    d = GaussianDiffusion(1000)
    calls = []

    def noise():
        calls.append(1)
        return torch.zeros(3, 1, 2, 2)

    sampler = SDEDPMSolverSampler(num_steps=7)
    sampler.run(Denoiser(gaussian_eps(d, 0.1, 0.5), d), torch.randn(3, 1, 2, 2), noise)
    assert len(calls) == len(sampler.visited(d)) - 1 == 6


def output_law(sampler, diffusion, mu, s, num_noises):
    """Exact mean and std of the sampler's output for x_T ~ N(0, 1), in float64.

    The eps model of Gaussian data is affine in x, so the output is an affine function of x_T and the noise draws:
    image 0 starts from all zeros (the constant, = the mean), image 1 from x_T = 1, image 1 + k from the k-th noise
    draw = 1; the variance is the sum of the squared coefficients.
    """
    count = 2 + num_noises
    x_T = torch.zeros(count, 1, 1, 1, dtype=torch.float64)
    x_T[1] = 1
    draws = iter(range(num_noises))

    def noise():
        z = torch.zeros(count, 1, 1, 1, dtype=torch.float64)
        z[2 + next(draws)] = 1
        return z

    out = sampler.run(Denoiser(gaussian_eps(diffusion, mu, s), diffusion), x_T, noise).flatten()
    assert next(draws, None) is None  # every draw was used
    return out[0].item(), (out[1:] - out[0]).pow(2).sum().sqrt().item()


MU, S = 0.3, 0.5


def law_errors(sampler, d):
    noises = len(sampler.visited(d)) - 1 if isinstance(sampler, SDEDPMSolverSampler) else 0
    mean, std = output_law(sampler, d, MU, S, noises)
    return abs(mean - MU), abs(std - S)


@pytest.mark.parametrize("cls", [DPMSolverSampler, DPMSolver3MSampler, SDEDPMSolverSampler])
def test_output_converges_to_the_data_gaussian(cls):
    d = GaussianDiffusion(1000)
    errors = {n: law_errors(cls(num_steps=n), d) for n in (20, 50, 200)}
    assert max(errors[20]) < 0.02  # measured std: 0.507 (2M), 0.504 (3M), 0.517 (SDE); means within 1e-3
    assert max(errors[200]) < max(errors[50]) < max(errors[20])  # more steps, a closer law
    # what is left at 200 steps (~1e-4) is mostly starting from N(0, 1) at t = T - 1 instead of the exact marginal
    assert max(errors[200]) < 2e-3


@pytest.mark.parametrize("spacing, num_steps", [("logsnr", 15), ("logsnr", 20), ("trailing", 10), ("quadratic", 10)])
def test_3m_is_at_least_as_accurate_as_2m(spacing, num_steps):
    d = GaussianDiffusion(1000)
    std_2m = law_errors(DPMSolverSampler(num_steps=num_steps, spacing=spacing), d)[1]
    std_3m = law_errors(DPMSolver3MSampler(num_steps=num_steps, spacing=spacing), d)[1]
    assert std_3m <= std_2m


def test_3m_overshoots_2m_at_10_logsnr_steps():
    """The exception, measured (and the same in diffusers, which the lockstep tests pin): at 10 log-SNR steps each
    step is h ~ 1.1 wide, and the quadratic extrapolation of the x0 predictions overshoots where D changes fastest
    (lambda ~ log(1/s)). The std is 0.567 with 3M against 0.516 with 2M; from 15 steps on 3M is the closer one."""
    d = GaussianDiffusion(1000)
    assert law_errors(DPMSolverSampler(num_steps=10), d)[1] == pytest.approx(0.0159, abs=2e-4)
    assert law_errors(DPMSolver3MSampler(num_steps=10), d)[1] == pytest.approx(0.0669, abs=2e-4)


def test_sde_samples_recover_the_gaussian():
    """Through sample(): 4000 draws in float32, standard errors 0.008 (mean) and 0.006 (std)."""
    d = GaussianDiffusion(1000)
    x = SDEDPMSolverSampler(num_steps=20).sample(gaussian_eps(d, MU, S), d, (4000, 1, 1, 1),
                                                 generator=torch.Generator().manual_seed(0))
    assert x.mean().item() == pytest.approx(MU, abs=0.025)
    assert x.std().item() == pytest.approx(S, abs=0.02)


@pytest.mark.parametrize("cls", [DPMSolver3MSampler, SDEDPMSolverSampler])
def test_config_is_name_and_fields_and_yaml_matches_defaults(cls):
    sampler = cls()
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert sampler.config() == {"name": cls.name, **{k: v for k, v in fields.items() if k != "progress"}}
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / f"{cls.name}.yaml"))
    assert yaml.pop("_target_") == f"{cls.__module__}.{cls.__name__}"
    assert yaml == fields
