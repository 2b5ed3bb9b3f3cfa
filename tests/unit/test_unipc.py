"""UniPC: step-by-step agreement with diffusers' UniPCMultistepScheduler, and the Gaussian limit in float64.

diffusers settings that agree: ``UniPCMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=..., final_sigmas_type="zero",
disable_corrector=[] (corrector on) or every step index (off), timestep_spacing="trailing")``. Compared: the state
passed to every network evaluation (a recording net, 1e-4 absolute: diffusers float32, this project float64) and
the final output.

Convention differences, and how they are tested:
- Timesteps. Only ``trailing`` gives the same list (asserted): diffusers' ``linspace`` and ``leading`` take S + 1
  points and drop t = 0, this project's keep it. The default ``logsnr`` list has no diffusers spacing; it is
  compared by writing our list (and its sigmas) into the diffusers scheduler after ``set_timesteps``.
- The last step. diffusers goes to sigma = 0 with the first-order update, whose value is its last x0 prediction
  (``model_outputs[-1]``); this sampler returns that prediction. diffusers 0.42.1 itself returns NaN there for
  ``bh1`` (B(h) = -h = -inf times its empty sum) and for ``lower_order_final=False`` (r_k = 0 at h = inf), so the
  final output is compared with ``model_outputs[-1]``, and with diffusers' own result where that is finite (bh2).
  diffusers runs the corrector once more at the last timestep; sigma = 0 multiplies it away, so it is skipped here.
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers import DDIMSampler, DPMSolverSampler
from diffusion_lab.samplers.unipc import UniPCSampler

diffusers = pytest.importorskip("diffusers")

YAML = Path(__file__).resolve().parents[2] / "diffusion_lab" / "conf" / "sampler" / "unipc.yaml"


def recording_net(diffusion, inputs):
    """Gaussian data N(0.2, 0.6^2)'s closed-form eps plus a nonlinear term; records every input state."""

    def net(x, t):
        inputs.append(x.detach().clone())
        a = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * 0.2) / (a * 0.36 + 1 - a) + 0.1 * torch.tanh(x) * (1 - a)

    return net


def diffusers_unipc(sampler, num_steps):
    return diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="linear", solver_order=sampler.order, solver_type=sampler.variant,
        predict_x0=True, lower_order_final=sampler.lower_order_final, final_sigmas_type="zero",
        disable_corrector=[] if sampler.corrector else list(range(num_steps)), timestep_spacing="trailing")


def compare(sampler, diffusion):
    steps = sampler.visited(diffusion)
    theirs = diffusers_unipc(sampler, len(steps))
    theirs.set_timesteps(len(steps))
    if sampler.spacing == "trailing":
        assert steps == theirs.timesteps.tolist()
    else:  # our list (and its VE sigmas, then 0) written into the scheduler
        theirs.timesteps = torch.tensor(steps)
        ac = theirs.alphas_cumprod[steps]
        theirs.sigmas = torch.cat([((1 - ac) / ac).sqrt(), torch.zeros(1)])
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ours_in, theirs_in = [], []
    ours_out = sampler.sample(recording_net(diffusion, ours_in), diffusion, x_T.shape, x_T=x_T)
    net, x = recording_net(diffusion, theirs_in), x_T.clone()
    for t in theirs.timesteps[:-1]:
        x = theirs.step(net(x, torch.full((4,), int(t))), t, x).prev_sample
    t_last = theirs.timesteps[-1]
    out = net(x, torch.full((4,), int(t_last)))
    assert len(ours_in) == len(theirs_in) == len(steps)  # NFE = the visited timesteps
    for t, a, b in zip(steps, ours_in, theirs_in):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"network input at t={t}: {m}")
    # the last x0 prediction, from which diffusers' last update (to sigma = 0) is computed
    torch.testing.assert_close(ours_out, theirs.convert_model_output(out, sample=x), atol=1e-4, rtol=0)
    if sampler.variant == "bh2" and sampler.lower_order_final:  # diffusers' own last step is finite only here
        torch.testing.assert_close(ours_out, theirs.step(out, t_last, x).prev_sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_steps", [5, 10])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("corrector", [True, False])
def test_unipc_matches_diffusers(num_steps, order, variant, corrector):
    sampler = UniPCSampler(num_steps=num_steps, spacing="trailing", order=order, variant=variant, corrector=corrector)
    compare(sampler, GaussianDiffusion(1000))


@pytest.mark.parametrize("order, variant, corrector, lower_order_final",
                         [(2, "bh2", True, True), (3, "bh1", True, True), (3, "bh2", False, True),
                          (3, "bh2", True, False), (2, "bh1", True, False)])
def test_unipc_matches_diffusers_on_logsnr_steps(order, variant, corrector, lower_order_final):
    """The default spacing, and lower_order_final=False (order 3 up to the next-to-last step)."""
    sampler = UniPCSampler(num_steps=8, order=order, variant=variant, corrector=corrector,
                           lower_order_final=lower_order_final)
    compare(sampler, GaussianDiffusion(1000))


def test_corrector_and_variant_change_the_result():
    """Guards against a test that passes because both sides ignore a field: each field moves the output."""
    d, outs = GaussianDiffusion(1000), {}
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for key in [(2, "bh2", True), (2, "bh2", False), (2, "bh1", True), (3, "bh2", True)]:
        sampler = UniPCSampler(num_steps=6, order=key[0], variant=key[1], corrector=key[2])
        outs[key] = sampler.sample(recording_net(d, []), d, x_T.shape, x_T=x_T)
    base = outs[(2, "bh2", True)]
    for key, out in outs.items():
        assert key == (2, "bh2", True) or (out - base).abs().max() > 1e-4, key


def gaussian_eps64(diffusion, mu, s):
    def net(x, t):
        a = diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return net


def affine_map(sampler, diffusion, net):
    """For Gaussian data every ODE sampler maps x_T to A x_T + B: samples of x_T ~ N(0, 1) are N(B, A^2)."""
    x_T = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    out = sampler.sample(net, diffusion, x_T.shape, x_T=x_T)
    return (out[1] - out[0]).item(), out[0].item()


def exact_limit(diffusion, mu, s):
    """(A*, B*): the ODE flow from t = 999 to t = 0, then the x0 prediction there (where every sampler here ends),
    the limit of all of them as the steps grow. Along the flow x_t = sqrt(a_t) mu + sqrt(a_t s^2 + 1 - a_t) z, and
    D(x) = mu + sqrt(a) s^2 (x - sqrt(a) mu) / (a s^2 + 1 - a)."""
    a_T, a_0 = diffusion.alphas_cumprod[999].item(), diffusion.alphas_cumprod[0].item()
    scale = math.sqrt(a_0 * s**2 + 1 - a_0) / math.sqrt(a_T * s**2 + 1 - a_T)
    A = math.sqrt(a_0) * s**2 / (a_0 * s**2 + 1 - a_0) * scale
    return A, mu - A * math.sqrt(a_T) * mu


def test_unipc_recovers_a_gaussian_in_float64():
    """Samples of N(0, 1) go to N(B, A^2) -> N(B*, A*^2), within 1e-3 of the data's N(mu, s^2).

    Measured |(A, B) - (A*, B*)| at 5 / 10 / 20 / 40 steps: UniPC-2 (bh2) 8.7e-2 / 2.6e-2 / 4.8e-3 / 6.5e-4 (third
    order: the corrector adds one), DPM-Solver++(2M) 1.0e-1 / 1.6e-2 / 7.4e-3 / 1.9e-3 (second order), DDIM 0.24 /
    0.12 / 6.0e-2 / 3.0e-2; UniPC-3 at 20 steps 3.7e-4. At 10 steps (h ~ 1 in log-SNR) DPM-Solver++ is still the
    closer of the two on this data; from 20 steps on UniPC is.
    """
    d = GaussianDiffusion(1000)
    mu, s = 0.3, 0.5
    net = gaussian_eps64(d, mu, s)
    A_star, B_star = exact_limit(d, mu, s)
    assert abs(A_star - s) < 1e-3 and abs(B_star - mu) < 1e-3

    def error(sampler):
        A, B = affine_map(sampler, d, net)
        return math.hypot(A - A_star, B - B_star)

    unipc = {n: error(UniPCSampler(num_steps=n)) for n in (5, 10, 20, 40)}
    dpm = {n: error(DPMSolverSampler(num_steps=n)) for n in (20, 40)}
    assert unipc[40] < unipc[20] < unipc[10] < unipc[5] < 0.1
    assert unipc[10] < error(DDIMSampler(num_steps=10, spacing="logsnr")) / 4
    assert unipc[20] / unipc[40] > 6 > 4.5 > dpm[20] / dpm[40]  # third order vs DPM-Solver++'s second
    assert unipc[20] < dpm[20] / 1.5 and unipc[40] < dpm[40] / 2.5
    assert error(UniPCSampler(num_steps=20, order=3)) < unipc[20] / 10


def test_unip2_bh2_without_corrector_is_dpm_solver_pp_2m():
    """B(h) = e^{-h} - 1 and rho = 1/2 make UniP-2 exactly the DPM-Solver++(2M) update; the corrector moves it."""
    d = GaussianDiffusion(1000)
    x_T = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net = gaussian_eps64(d, 0.3, 0.5)
    unip = UniPCSampler(num_steps=12, corrector=False).sample(net, d, x_T.shape, x_T=x_T)
    dpm = DPMSolverSampler(num_steps=12).sample(net, d, x_T.shape, x_T=x_T)
    torch.testing.assert_close(unip, dpm, atol=1e-12, rtol=0)
    assert (UniPCSampler(num_steps=12).sample(net, d, x_T.shape, x_T=x_T) - dpm).abs().max() > 1e-3


def test_unipc_nfe_is_the_visited_steps():
    d = GaussianDiffusion(1000)
    for sampler in (UniPCSampler(), UniPCSampler(num_steps=7, order=3, corrector=False), UniPCSampler(num_steps=1)):
        calls = []
        sampler.sample(recording_net(d, calls), d, (2, 1, 2, 2), seed=0)
        assert len(calls) == len(sampler.visited(d))


@pytest.mark.parametrize("field, value, allowed", [("order", 1, "2, 3"), ("order", 4, "2, 3"),
                                                   ("order", True, "2, 3"), ("variant", "bh3", "bh1, bh2")])
def test_bad_fields_are_refused(field, value, allowed):
    with pytest.raises(ConfigError, match=f"{field}={value!r} is not allowed; allowed values: {allowed}"):
        UniPCSampler(**{field: value})


def test_config_and_yaml_defaults():
    assert UniPCSampler(order=3).config() == {
        "name": "unipc", "num_steps": 10, "spacing": "logsnr", "clip_denoised": False, "order": 3, "variant": "bh2",
        "corrector": True, "lower_order_final": True,
    }
    conf = yaml.safe_load(YAML.read_text())
    assert conf.pop("_target_") == "diffusion_lab.samplers.unipc.UniPCSampler"
    assert UniPCSampler(**conf) == UniPCSampler()
    assert set(conf) == {f.name for f in dataclasses.fields(UniPCSampler)}
    assert YAML.stem == UniPCSampler.name
