"""Objectives as config objects (issue 18): ``objective=<name>`` puts a ``_target_`` at ``model.objective``; the
older ``diffusion.loss`` settings name the same objects, so runs and checkpoints written before keep training the
same loss."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.config import validate_config
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.losses import HybridLoss, SimpleLoss, VLBLoss
from diffusion_lab.errors import ConfigError
from tests.conftest import compose_config


def build(overrides):
    cfg = compose_config("train", overrides)
    validate_config(cfg)
    diffusion = instantiate(cfg.diffusion)
    return instantiate(cfg.model, _partial_=True)(diffusion=diffusion, sampler=instantiate(cfg.sampler))


@pytest.mark.parametrize("group, legacy, kind", [
    ("simple", [], SimpleLoss),
    ("min_snr", ["diffusion.loss_weighting=min_snr"], SimpleLoss),
    ("vlb", ["diffusion.loss=vlb"], VLBLoss),
    ("hybrid", ["diffusion.loss=hybrid"], HybridLoss),
])
def test_an_objective_group_equals_the_diffusion_loss_it_replaces(group, legacy, kind):
    variance = ["diffusion.variance=learned_range"] if group in ("vlb", "hybrid") else []
    chosen = build([f"objective={group}", *variance])
    before = build([*legacy, *variance])
    assert type(chosen.objective) is kind and chosen.objective == before.objective
    # and the same loss on the same batch and draws
    before.net.load_state_dict(chosen.net.state_dict())
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    losses = [m.objective(Denoiser(m.net, m.diffusion), x0, None, torch.Generator().manual_seed(0))[0]
              for m in (chosen, before)]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def test_an_objective_that_cannot_train_the_diffusion_is_refused():
    with pytest.raises(ConfigError, match="objective=hybrid .* needs diffusion.variance=learned_range"):
        build(["objective=hybrid"])
    with pytest.raises(ConfigError, match="learned"):
        build(["objective=simple", "diffusion.variance=learned_range"])
    with pytest.raises(ConfigError, match="the objective is given twice: .* diffusion.loss=vlb"):
        build(["objective=vlb", "diffusion.loss=vlb", "diffusion.variance=learned_range"])
