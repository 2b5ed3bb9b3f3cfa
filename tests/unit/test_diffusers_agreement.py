"""Step-by-step agreement with diffusers' DDPMScheduler / DDIMScheduler: same eps-model, noise and timesteps.

Tolerance: 1e-4 absolute per step. diffusers keeps its schedule in float32 and this project in float64,
which accounts for differences of ~1e-6 per step.
Compared spacings: DDPM leading, trailing and linspace. DDIM leading and trailing only: DDIMScheduler derives
the previous timestep as t - T // S, which disagrees with its own linspace list; this project reads it from
the list.
"""

import pytest
import torch

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, Noise

diffusers = pytest.importorskip("diffusers")


def eps_model(diffusion):
    """The closed-form eps-predictor of Gaussian data N(0.2, 0.6^2): smooth and non-trivial at every t."""

    def net(x, t):
        a = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * 0.2) / (a * 0.36 + 1 - a)

    return net


def run_both(ours, theirs, diffusion, step_kwargs=None):
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    net = eps_model(diffusion)
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = Noise(x0.shape, x0.device, generator=g_ours)
    steps = ours.visited(diffusion)
    assert steps == theirs.timesteps.tolist()
    x_ours, x_theirs = x0.clone(), x0.clone()
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        x_ours = ours.step(Denoiser(net, diffusion), x_ours, t, t_prev, noise)
        out = net(x_theirs, torch.full((4,), t))
        x_theirs = theirs.step(out, t, x_theirs, generator=g_theirs, **(step_kwargs or {})).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, atol=1e-4, rtol=0, msg=f"t={t}")


# fixed_large only with leading spacing: when the last visited t is not 0 (trailing, linspace), diffusers adds
# sigma z at the last step, where Ho et al.'s Algorithm 2 adds none (this project follows the paper).
DDPM_CASES = [("leading", "fixed_large"), ("leading", "fixed_small"), ("trailing", "fixed_small"),
              ("linspace", "fixed_small")]


@pytest.mark.parametrize("spacing, variance", DDPM_CASES)
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_matches_diffusers(spacing, variance, clip):
    d = GaussianDiffusion(1000)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type=variance,
                                     clip_sample=clip, timestep_spacing=spacing)
    theirs.set_timesteps(50)
    run_both(DDPMSampler(num_steps=50, spacing=spacing, variance=variance, clip_denoised=clip), theirs, d)


def test_ddpm_full_chain_matches_diffusers():
    d = GaussianDiffusion(1000)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large")
    theirs.set_timesteps(1000)
    run_both(DDPMSampler(variance="fixed_large"), theirs, d)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip, clipped_output", [(True, False), (True, True), (False, False)])
def test_ddim_matches_diffusers(spacing, eta, clip, clipped_output):
    d = GaussianDiffusion(1000)
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip,
                                     set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    theirs.set_timesteps(20)
    ours = DDIMSampler(num_steps=20, spacing=spacing, eta=eta, clip_denoised=clip, use_clipped_model_output=clipped_output)
    run_both(ours, theirs, d, {"eta": eta, "use_clipped_model_output": clipped_output})


def learned_range_model(diffusion):
    """2C channels: the closed-form eps of eps_model, then a v in (-1, 1) that varies with x and t."""
    eps = eps_model(diffusion)

    def net(x, t):
        v = torch.tanh(x + (t.float() / 500 - 1).view(-1, 1, 1, 1))
        return torch.cat([eps(x, t), v], dim=1)

    return net


@pytest.mark.parametrize("num_steps, clip", [(1000, True), (50, True), (50, False)])
def test_ddpm_learned_range_matches_diffusers(num_steps, clip):
    """Improved DDPM's learned variance, full chain and strided (respaced log beta and log beta-tilde)."""
    d = GaussianDiffusion(1000, variance="learned_range")
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                                     clip_sample=clip, timestep_spacing="leading")
    theirs.set_timesteps(num_steps)
    ours = DDPMSampler(num_steps=num_steps, variance="learned_range", clip_denoised=clip)
    x0 = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    net = learned_range_model(d)
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = Noise(x0.shape, x0.device, generator=g_ours)
    steps = ours.visited(d)
    assert steps == theirs.timesteps.tolist()
    x_ours, x_theirs = x0.clone(), x0.clone()
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        x_ours = ours.step(Denoiser(net, d), x_ours, t, t_prev, noise)
        out = net(x_theirs, torch.full((4,), t))
        x_theirs = theirs.step(out, t, x_theirs, generator=g_theirs).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, atol=1e-4, rtol=0, msg=f"t={t}")
    # the learned variance changed the chain: the same steps with fixed_large end elsewhere
    fixed = DDPMSampler(num_steps=num_steps, variance="fixed_large", clip_denoised=clip)
    x_fixed, noise = x0.clone(), Noise(x0.shape, x0.device, generator=torch.Generator().manual_seed(5))
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        x_fixed = fixed.step(Denoiser(net, d), x_fixed, t, t_prev, noise)
    assert (x_fixed - x_ours).abs().max() > 1e-2


@pytest.mark.parametrize("num_steps", [2, 5, 10, 20, 50])
def test_karras_spacing_is_diffusers_karras_timesteps(num_steps):
    """``karras``: the integer timesteps of Karras et al.'s rho = 7 sigmas. diffusers' DPMSolverMultistepScheduler
    (use_karras_sigmas=True) rounds the same sigmas to the same timesteps, but then steps with the unrounded sigmas;
    this project steps with the sigmas of the timesteps the net is evaluated at (the model knows only those)."""
    from diffusion_lab.samplers.timesteps import karras_sigmas, timesteps

    d = GaussianDiffusion(1000)
    theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                   use_karras_sigmas=True)
    theirs.set_timesteps(num_steps)
    ours = timesteps(1000, num_steps, "karras", d.alphas_cumprod)
    assert ours == theirs.timesteps.tolist()
    sigma = ((1 - d.alphas_cumprod) / d.alphas_cumprod).sqrt().numpy()
    torch.testing.assert_close(torch.from_numpy(karras_sigmas(num_steps, sigma[0], sigma[-1])),
                               theirs.sigmas[:-1].double(), rtol=1e-4, atol=0)
