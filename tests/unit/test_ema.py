"""EMAModel: torch's AveragedModel arithmetic without reading the step counter on the host every update."""

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffusion_lab.callbacks.sync_check import HostReadGuard
from diffusion_lab.training.module import EMAModel, EMAUpdate


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
    net.register_buffer("scale", torch.randn(3))  # a float buffer: averaged too (use_buffers=True)
    return net


def perturb(net: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            t.add_(torch.randn(t.shape, generator=g))


def test_matches_torch_averaged_model_and_reads_the_counter_once():
    decay, steps = 0.9, 5
    nets = []  # the weights after each training step
    net = make_net(0)
    for step in range(steps):
        perturb(net, step)
        nets.append(copy.deepcopy(net))
    reference = AveragedModel(make_net(0), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    for n in nets:
        reference.update_parameters(n)  # torch's own: reads the counter on the host twice per update

    with HostReadGuard(), pytest.raises(AssertionError, match="read a tensor on the host"):
        reference.update_parameters(nets[0])  # the guard does catch torch's reads

    ours = EMAModel(make_net(0), multi_avg_fn=EMAUpdate(decay), use_buffers=True)
    ours.update_parameters(nets[0])  # the first update copies the weights and reads the counter once
    with HostReadGuard():
        for n in nets[1:]:
            ours.update_parameters(n)
    assert int(ours.n_averaged) == int(reference.n_averaged) == steps
    for (name, a), b in zip(ours.module.state_dict().items(), reference.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # same kernels in the same order
    assert not torch.equal(ours.module[0].weight, nets[-1][0].weight)  # an average, not the latest weights


def test_loading_a_state_dict_rereads_the_counter():
    decay = 0.5
    net = make_net(1)
    ema = EMAModel(net, multi_avg_fn=EMAUpdate(decay), use_buffers=True)
    fresh_state = {k: v.clone() for k, v in ema.state_dict().items()}  # n_averaged == 0
    for step in range(3):
        perturb(net, step)
        ema.update_parameters(net)
    # Back to a never-updated state: the next update must copy the weights again, not average.
    ema.load_state_dict(fresh_state)
    perturb(net, 7)
    ema.update_parameters(net)
    torch.testing.assert_close(ema.module[0].weight, net[0].weight, rtol=0, atol=0)
    assert int(ema.n_averaged) == 1
    # And from a mid-run state the next update averages with the loaded weights: ema = d * loaded + (1 - d) * w.
    loaded = {k: v.clone() for k, v in ema.state_dict().items()}
    ema2 = EMAModel(make_net(2), multi_avg_fn=EMAUpdate(decay), use_buffers=True)
    ema2.load_state_dict(loaded)
    perturb(net, 8)
    ema2.update_parameters(net)
    expected = decay * loaded["module.0.weight"] + (1 - decay) * net[0].weight
    torch.testing.assert_close(ema2.module[0].weight, expected)
    assert int(ema2.n_averaged) == 2
