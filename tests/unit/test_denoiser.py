"""The seam between the network and the maths: decoding, guidance, and unchanged unconditional sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion.denoiser import Condition, Denoiser, check_net, net_output_channels
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler


class FixedOutputs(nn.Module):
    """A 'network' whose output is fixed per class: out = table[label] * (1 + 0 x); null class = num_classes."""

    def __init__(self, table: torch.Tensor, out_channels: int = 1) -> None:
        super().__init__()
        self.table = table  # (num_classes + 1, out_channels, H, W)
        self.config = SimpleNamespace(in_channels=1, out_channels=out_channels, image_size=table.shape[-1],
                                      num_classes=table.shape[0] - 1)
        self.calls: list[int] = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(len(x))
        labels = torch.full((len(x),), self.config.num_classes) if class_labels is None else class_labels
        return self.table[labels] + 0 * x[:, :1]


def _closed_form(d: GaussianDiffusion, t: torch.Tensor):
    abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_prediction_decodes_each_parameterisation_by_its_closed_form(prediction_type):
    """x_t = a x0 + s eps, v = a eps - s x0 (a = sqrt(alpha-bar), s = sqrt(1 - alpha-bar)), written out here."""
    d = GaussianDiffusion(1000, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 100, 500, 900, 999])
    a, s = _closed_form(d, t)
    x_t = a * x0 + s * eps
    output = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction_type]
    prediction = Denoiser(lambda x, tt: output, d)(x_t, t)
    torch.testing.assert_close(prediction.x0, x0, atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(prediction.eps, eps, atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(prediction.mean_output, output)
    assert prediction.v is None
    torch.testing.assert_close(Denoiser(lambda x, tt: output, d).target(x0, t, eps), output, atol=1e-5, rtol=1e-5)
    # clipping: x0 in [-1, 1] and eps recomputed from the clipped x0, (x_t - a clip(x0)) / s
    clipped = Denoiser(lambda x, tt: output, d)(x_t, t, clip_x0=True)
    torch.testing.assert_close(clipped.x0, prediction.x0.clamp(-1, 1))
    torch.testing.assert_close(clipped.eps, (x_t - a * prediction.x0.clamp(-1, 1)) / s, atol=1e-4, rtol=1e-4)


def test_a_learned_variance_is_the_second_half_and_interpolates_eq_15():
    d = GaussianDiffusion(1000, variance="learned_range", loss="hybrid")
    eps, v = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([10, 700])
    prediction = Denoiser(lambda x, tt: torch.cat([eps, v], 1), d)(torch.zeros(2, 1, 4, 4), t)
    torch.testing.assert_close(prediction.eps, eps)
    torch.testing.assert_close(prediction.v, v)
    log_beta, log_tilde = d.betas[t].log().float().view(-1, 1, 1, 1), d.posterior_variance[t].log().float().view(-1, 1, 1, 1)
    frac = (v + 1) / 2
    torch.testing.assert_close(prediction.log_variance(log_beta, log_tilde), frac * log_beta + (1 - frac) * log_tilde)
    assert net_output_channels(3, "learned_range") == 6 and net_output_channels(3, "fixed_small") == 3


def test_the_net_contract_is_checked_once_with_the_fix():
    d = GaussianDiffusion(10, variance="learned_range", loss="hybrid")
    net = FixedOutputs(torch.zeros(3, 1, 4, 4))
    with pytest.raises(ConfigError, match="needs 2; set model.net.out_channels=2"):
        check_net(net, d)
    assert check_net(FixedOutputs(torch.zeros(3, 2, 4, 4), out_channels=2), d)["num_classes"] == 2


def test_a_guided_output_is_the_hand_written_formula_in_one_batched_forward():
    """out = out_u + w (out_c - out_u) on the mean part (Ho & Salimans 2022 eq. 6 with w = 1 + their w)."""
    g = torch.Generator().manual_seed(1)
    table = torch.randn(4, 1, 4, 4, generator=g)  # classes 0, 1, 2 and the null class 3
    net = FixedOutputs(table)
    d = GaussianDiffusion(1000)
    x, t, labels = torch.randn(3, 1, 4, 4, generator=g), torch.tensor([5, 50, 500]), torch.tensor([2, 0, 1])
    denoiser = Denoiser(net, d)
    for w in (0.0, 1.5, 3.0, 7.5):
        net.calls.clear()
        got = denoiser(x, t, Condition(labels, w))
        expected_eps = table[3] + w * (table[labels] - table[3])
        torch.testing.assert_close(got.eps, expected_eps)
        a, s = _closed_form(d, t)
        torch.testing.assert_close(got.x0, (x - s * expected_eps) / a, atol=1e-4, rtol=1e-4)
        assert net.calls == [6]  # both branches in one forward of 2B images


def test_a_learned_variance_under_guidance_comes_from_the_conditional_branch():
    table = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    d = GaussianDiffusion(1000, variance="learned_range", loss="hybrid")
    got = Denoiser(FixedOutputs(table, out_channels=2), d)(torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]),
                                                             Condition(torch.tensor([0, 1]), 4.0))
    torch.testing.assert_close(got.v, table[[0, 1], 1:])
    torch.testing.assert_close(got.eps, table[2, :1] + 4.0 * (table[[0, 1], :1] - table[2, :1]))


@pytest.mark.parametrize("sampler", [DDPMSampler(num_steps=10), DDIMSampler(num_steps=10, eta=0.5),
                                     DPMSolverSampler(num_steps=8)], ids=["ddpm", "ddim", "dpm_solver"])
def test_guidance_scale_1_is_the_conditional_model_alone_bit_for_bit(sampler):
    class Conditional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.embed = nn.Embedding(4, 1)
            self.config = SimpleNamespace(in_channels=1, out_channels=1, image_size=4, num_classes=3)

        def forward(self, x, t, class_labels=None):
            labels = torch.full((len(x),), 3) if class_labels is None else class_labels
            return self.conv(x) + self.embed(labels).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000

    torch.manual_seed(0)
    net, d = Conditional(), GaussianDiffusion(100)
    labels = torch.tensor([0, 1, 2, 1])
    guided = sampler.sample(net, d, (4, 1, 4, 4), seed=3, cond=Condition(labels, 1.0))
    alone = sampler.sample(lambda x, t: net(x, t, labels), d, (4, 1, 4, 4), seed=3)
    assert torch.equal(guided, alone)
    assert not torch.equal(guided, sampler.sample(net, d, (4, 1, 4, 4), seed=3, cond=Condition(labels, 3.0)))


def test_an_unconditional_model_refuses_class_labels():
    with pytest.raises(ConfigError, match="this model is unconditional"):
        Denoiser(lambda x, t: x, GaussianDiffusion(10))(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long),
                                                       Condition(torch.tensor([0])))


# Regression values: the first 4 pixels of image 0 and the sum over both images from each sampler on tiny_unet()
# (seed 0 weights, untrained, so DDIM/DPM-Solver overshoot far out of [-1, 1]; sample seed 5), computed with the
# code before the denoiser existed (commit 36acaca: the samplers called net(x, t) and decoded it with
# GaussianDiffusion.predict_x0_eps themselves; torch 2.14.1, CPU, 1 thread) and equal after it to the printed digits.
# Why they are right: the seam moves code, not maths, so every number must stay what it was.
BEFORE_THE_SEAM = {
    "ddpm": ([0.864418, 1.0, 0.704247, -0.233331], 1.7784346546977758),
    "ddim": ([56.438236, 135.757126, 18.492825, -42.628677], -67.98033404350281),
    "dpm_solver": ([141.549072, 285.789612, 13.15505, -120.125458], 118.21499538421631),
}


def test_an_unconditional_model_samples_what_it_sampled_before_the_seam():
    from tests.conftest import tiny_unet

    torch.manual_seed(0)
    net, d = tiny_unet().eval(), GaussianDiffusion(1000)
    c = net.config
    for name, sampler in (("ddpm", DDPMSampler(num_steps=10)), ("ddim", DDIMSampler(num_steps=10, eta=0.5)),
                          ("dpm_solver", DPMSolverSampler(num_steps=8))):
        x = sampler.sample(net, d, (2, c.in_channels, c.image_size, c.image_size), seed=5)
        first, total = BEFORE_THE_SEAM[name]
        assert x[0].flatten()[:4].tolist() == pytest.approx(first, rel=1e-4, abs=1e-5), name
        assert float(x.double().sum()) == pytest.approx(total, rel=1e-4), name
