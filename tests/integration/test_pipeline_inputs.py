"""Pipelines take what diffusers takes (a list of generators) and refuse scheduler fields they would silently drop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_lab.nets import UNet
from diffusion_lab.pipelines import DDIMPipeline, DDPMPipeline, FormatError, SchedulerConfig
from diffusion_lab.samplers import DDIMSampler, DPMSolverSampler

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    unet = UNet(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), dropout=0.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero output layers: a real, image-dependent eps
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return unet.eval()


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("ours_cls, theirs_name, kwargs", [
    (DDIMPipeline, "DDIMPipeline", {"eta": 0.7, "num_inference_steps": 6}),  # eta > 0: noise at every step too
    (DDPMPipeline, "DDPMPipeline", {"num_inference_steps": 6}),
])
def test_a_list_of_generators_gives_image_k_from_generator_k_as_in_diffusers(net, tmp_path, ours_cls, theirs_name,
                                                                            kwargs):
    pipe = ours_cls(net, SchedulerConfig(clip_sample=True))
    pipe.save_pretrained(tmp_path)
    theirs = getattr(diffusers, theirs_name).from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    ours = pipe(batch_size=3, generator=generators(10, 11, 12), output_type="np", **kwargs).images
    expected = theirs(batch_size=3, generator=generators(10, 11, 12), output_type="np", **kwargs).images
    assert np.abs(ours - expected).max() < 1e-4
    # image k is the one generator k alone draws (the batch does not matter)
    alone = pipe(batch_size=1, generator=generators(11), output_type="np", **kwargs).images
    np.testing.assert_allclose(ours[1], alone[0], atol=1e-5, rtol=0)
    assert np.abs(ours[0] - ours[1]).max() > 0.05
    with pytest.raises(ValueError, match="a list of 2 generators for a batch of 3 images"):
        pipe(batch_size=3, generator=generators(1, 2), **kwargs)


def test_ddim_and_dpm_solver_do_not_clip_by_default():
    assert DDIMSampler().clip_denoised is False and DPMSolverSampler().clip_denoised is False
    # and the config file says the same for DDIM
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
        cfg = compose("train", overrides=["sampler=ddim"])
    GlobalHydra.instance().clear()
    assert cfg.sampler.clip_denoised is DDIMSampler().clip_denoised


@pytest.mark.parametrize("field, value", [
    ("steps_offset", 1), ("set_alpha_to_one", False), ("clip_sample_range", 0.5), ("thresholding", True),
])
def test_scheduler_fields_that_would_change_sampling_are_refused_by_name(tmp_path, field, value):
    SchedulerConfig().save(tmp_path, "DDIMScheduler")
    path = tmp_path / "scheduler_config.json"
    raw = json.loads(path.read_text())
    assert SchedulerConfig.load(tmp_path) == SchedulerConfig()  # the defaults diffusers writes load
    # diffusers really samples differently with the field (so dropping it silently would be wrong)
    base = raw | ({"clip_sample": False} if field == "thresholding" else {})  # thresholding replaces clipping
    default = diffusers.DDIMScheduler.from_config(base)
    changed = diffusers.DDIMScheduler.from_config(base | {field: value})
    assert _ddim_differs(default, changed)
    path.write_text(json.dumps(raw | {field: value}))
    with pytest.raises(FormatError, match=f"{field}={json.dumps(value)} is not supported"):
        SchedulerConfig.load(tmp_path)


def _ddim_differs(a, b) -> bool:
    """Run three DDIM steps of a fixed eps-model with both schedulers; True when the results differ."""
    out = []
    for scheduler in (a, b):
        scheduler.set_timesteps(3)
        x = torch.linspace(-3, 3, 16).view(1, 1, 4, 4)
        for t in scheduler.timesteps:
            eps = 0.3 * x + 0.1
            x = scheduler.step(eps, t, x).prev_sample
        out.append(x)
    return bool((out[0] - out[1]).abs().max() > 1e-4)


def test_clip_sample_range_is_ignored_when_clipping_is_off(tmp_path):
    SchedulerConfig(clip_sample=False).save(tmp_path, "DDIMScheduler")
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"clip_sample_range": 2.0}))
    assert SchedulerConfig.load(tmp_path).clip_sample is False
