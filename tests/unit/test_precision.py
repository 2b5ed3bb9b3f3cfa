"""Sampling in mixed precision: autocast around the network only, the sampler's arithmetic in float32."""

from __future__ import annotations

import warnings

import pytest
import torch

from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.loading import PrecisionError, sampling_net
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from tests.conftest import tiny_unet


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    # perturbed: a non-zero output layer, so the prediction is not trivially zero
    return tiny_unet(perturb=0.02, ch_mult=(1, 2), attn_resolutions=(4,), dropout=0.0).eval()


class Recorder(torch.nn.Module):
    """Records the dtype the network's matmuls run in and what the sampler receives."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config, self.inner, self.outer = net, net.config, [], []
        net.conv_in.register_forward_hook(lambda m, i, o: self.inner.append(o.dtype))

    def forward(self, x, t):
        return self.net(x, t)


def test_bf16_mixed_runs_the_network_in_bf16_and_returns_float32(net):
    recorder = Recorder(net)
    wrapped = sampling_net(recorder, "bf16-mixed")
    x = torch.randn(2, 1, 8, 8)
    out = wrapped(x, torch.tensor([10, 500]))
    assert recorder.inner == [torch.bfloat16] and out.dtype == torch.float32
    full = sampling_net(net, "32")(x, torch.tensor([10, 500]))
    # bf16 has an 8-bit mantissa: the outputs agree to a few 1e-2, not exactly
    assert 0 < (out - full).abs().max() < 0.1


@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=10), DDPMSampler(num_steps=10),
                                     DPMSolverSampler(num_steps=10)], ids=["ddim", "ddpm", "dpm_solver"])
def test_bf16_mixed_sampling_stays_float32_and_close_to_fp32(net, sampler):
    diffusion = GaussianDiffusion(100)
    full = sampler.sample(sampling_net(net, "32"), diffusion, (4, 1, 8, 8), seed=0)
    half = sampler.sample(sampling_net(net, "bf16-mixed"), diffusion, (4, 1, 8, 8), seed=0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    error = (half - full).abs().max().item()
    assert 0 < error < 0.15 * full.abs().max().item(), error


def test_unknown_precision_is_refused(net):
    with pytest.raises(PrecisionError, match="allowed: 32, bf16-mixed, 16-mixed"):
        sampling_net(net, "8-mixed")


def precision_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "precision=" in str(w.message)]


@pytest.mark.parametrize("native", [False, True])
def test_low_precision_on_a_cpu_without_native_kernels_warns_once(net, monkeypatch, native):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    wrapped = sampling_net(net, "bf16-mixed")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    first = precision_warnings(lambda: wrapped(x, t))
    if native:
        assert first == []
    else:
        assert len(first) == 1 and "slow generic code" in first[0] and "Use precision=32" in first[0]
    assert precision_warnings(lambda: wrapped(x, t)) == []  # once per wrapped network, not every sampler step
    assert precision_warnings(lambda: sampling_net(net, "32")(x, t)) == []  # fp32 never warns
