"""What every registered sampler must do, run over the registry (conf/sampler/*.yaml), as diffusers'
SchedulerCommonTest runs over its schedulers: a sampler added to the registry is tested here without a line
of this file changing.

- its yaml is its own defaults and its name;
- NFE: the network is called exactly len(visited()) times;
- image i depends only on (seed, i), whatever the batch;
- on Gaussian data N(mu, s^2) (closed-form eps) it converges to the float64 answer as the steps grow: a
  deterministic sampler to the exact probability-flow endpoint of each x_T, a stochastic one to the moments;
- a learned-variance net (2C output channels) gives the same images as the fixed-variance net with the same
  mean part, for a sampler that does not read the variance (all but DDPM's learned_range);
- classifier-free guidance reaches it only through the denoiser: guided sampling equals sampling the
  closed-form guided eps directly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.samplers import registry

NAMES = sorted(registry.registered())
MU, S = 0.3, 0.5


def gaussian_eps(diffusion: GaussianDiffusion, mu: float, s: float):
    """eps* of data N(mu, s^2) at every t: E[eps | x_t] = sqrt(1 - a) (x - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def eps(x, t):
        a = diffusion.alphas_cumprod.to(x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return eps


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, *labels):
        self.calls += 1
        return self.fn(x, t, *labels)


def make(name: str, **fields) -> "registry.Sampler":
    return registry.build(name, **fields)


def deterministic(name: str, diffusion: GaussianDiffusion, net) -> bool:
    x = torch.randn(4, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = (make(name, num_steps=5).sample(net, diffusion, x.shape, x_T=x, seed=seed) for seed in (1, 2))
    return torch.equal(a, b)


def test_the_registry_is_the_yaml_folder():
    assert NAMES == sorted(p.stem for p in registry.CONF_DIR.glob("*.yaml"))
    assert {"ddpm", "ddim", "dpm_solver", "dpm_solver_3m", "sde_dpm_solver", "unipc", "ipndm", "heun",
            "euler_ancestral"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_is_the_samplers_own_defaults_and_name(name):
    config = OmegaConf.to_container(OmegaConf.load(registry.CONF_DIR / f"{name}.yaml"))
    cls = registry.sampler_class(config.pop("_target_"))
    assert cls.name == name
    assert config == {f.name: f.default for f in dataclasses.fields(cls)}
    sampler = make(name)
    assert sampler == cls()
    assert sampler.config() == {"name": name, **{k: v for k, v in config.items() if k != "progress"}}
    assert sampler.label() and sampler.label() != make(name, spacing="quadratic").label()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7])
def test_nfe_is_the_number_of_visited_timesteps(name, num_steps):
    d = GaussianDiffusion(100)
    net = Counting(gaussian_eps(d, MU, S))
    sampler = make(name, num_steps=num_steps)
    out = sampler.sample(net, d, (3, 1, 2, 2), seed=0)
    assert net.calls == len(sampler.visited(d)) >= 1
    assert out.shape == (3, 1, 2, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_image_i_depends_only_on_seed_and_i(name):
    d = GaussianDiffusion(100)
    net = gaussian_eps(d, 0.0, 0.7)
    sampler = make(name, num_steps=6)
    whole = sampler.sample(net, d, (12, 1, 2, 2), seed=1234)
    parts = [sampler.sample(net, d, (len(idx), 1, 2, 2), seed=1234, indices=idx)
             for idx in ([0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11])]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=0)
    assert not torch.allclose(whole, sampler.sample(net, d, (12, 1, 2, 2), seed=1235))


def gaussian_error(name: str, num_steps: int) -> float:
    """How far the sampler is from the float64 answer on N(MU, S^2) data, at ``num_steps``."""
    d = GaussianDiffusion(1000)
    net = gaussian_eps(d, MU, S)
    sampler = make(name, num_steps=num_steps, clip_denoised=False)  # clipping x0 to [-1, 1] would cut the tails
    if deterministic(name, d, net):
        x = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).view(-1, 1, 1, 1)
        a = d.alphas_cumprod[sampler.visited(d)[0]].double()
        exact = MU + S * (x - a.sqrt() * MU) / (a * S * S + 1 - a).sqrt()  # the flow maps quantile to quantile
        return float((sampler.sample(net, d, x.shape, x_T=x) - exact).abs().max())
    x = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler.sample(net, d, x.shape, x_T=x, generator=torch.Generator().manual_seed(1)).double()
    return max(abs(float(out.mean()) - MU), abs(float(out.std()) - S))


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_data_converges_to_the_float64_answer(name):
    # 4,000 draws: the moments of a stochastic sampler carry ~0.008 of sampling noise, hence 0.03 there
    coarse, fine = gaussian_error(name, 3), gaussian_error(name, 250)
    assert fine < 0.03 and fine < coarse / 2, (coarse, fine)


@pytest.mark.parametrize("name", NAMES)
def test_learned_variance_nets_work_where_the_sampler_ignores_the_variance(name):
    fixed, learned = GaussianDiffusion(100), GaussianDiffusion(100, variance="learned_range")
    eps = gaussian_eps(fixed, MU, S)
    sampler = make(name, num_steps=5)
    a = sampler.sample(eps, fixed, (4, 1, 2, 2), seed=3)
    b = sampler.sample(lambda x, t: torch.cat([eps(x, t), torch.full_like(x, 0.3)], 1), learned, (4, 1, 2, 2), seed=3)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


class ClassGaussians(nn.Module):
    """A conditional closed-form eps: class c's data is N(mu_c, S^2); the null class (2) is N(0, S^2)."""

    config = {"in_channels": 1, "out_channels": 1, "image_size": 2, "num_classes": 2}

    def __init__(self, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.diffusion = diffusion

    def forward(self, x, t, labels=None):
        mu = torch.tensor([-0.5, 0.5, 0.0], dtype=x.dtype)[labels].view(-1, 1, 1, 1)
        a = self.diffusion.alphas_cumprod.to(x.dtype)[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * S * S + 1 - a)


@pytest.mark.parametrize("name", NAMES)
def test_guidance_reaches_the_sampler_through_the_denoiser(name):
    d = GaussianDiffusion(100)
    net, labels, w = ClassGaussians(d), torch.tensor([0, 1, 1, 0]), 3.0
    sampler = make(name, num_steps=5)
    guided = sampler.sample(Denoiser(net, d), None, (4, 1, 2, 2), cond=Condition(labels, w), seed=5)

    def closed_form(x, t):
        uncond = net(x, t, torch.full_like(labels, 2))
        return uncond + w * (net(x, t, labels) - uncond)

    torch.testing.assert_close(guided, sampler.sample(closed_form, d, (4, 1, 2, 2), seed=5), atol=1e-6, rtol=0)


def test_a_sampler_added_only_to_the_registry_is_picked_up(tmp_path, monkeypatch):
    """A yaml dropped into the folder is a registered sampler: the registry lists it and the eval grid builds it."""
    from diffusion_lab.cli.evaluate import grid

    for path in registry.CONF_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "ddim_eta_half.yaml").write_text(
        f"_target_: {__name__}.HalfEtaDDIM\nnum_steps: 10\nspacing: uniform\nclip_denoised: false\neta: 0.5\n"
        "use_clipped_model_output: false\nprogress: false\n")
    monkeypatch.setattr(registry, "CONF_DIR", tmp_path)
    registry.registered.cache_clear()
    try:
        assert "ddim_eta_half" in registry.registered()
        cfg = OmegaConf.create({"grid": {"samplers": ["ddim_eta_half"], "steps": [4, 8]}, "spacing": None,
                                "nll": {"enabled": False}})
        cells = grid(cfg, GaussianDiffusion(100))
        assert [(type(c), c.num_steps, c.eta) for c in cells] == [(HalfEtaDDIM, 4, 0.5), (HalfEtaDDIM, 8, 0.5)]
    finally:
        registry.registered.cache_clear()


from diffusion_lab.samplers.ddim import DDIMSampler  # noqa: E402


@dataclasses.dataclass(frozen=True)
class HalfEtaDDIM(DDIMSampler):
    """A sampler that exists only in this test (DDIM at eta 0.5), registered by a yaml in a temporary folder."""

    eta: float = 0.5
    name = "ddim_eta_half"
