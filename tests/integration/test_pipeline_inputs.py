"""Pipelines take what diffusers takes (a list of generators) and refuse what they would silently drop or get wrong:
scheduler and U-Net fields, broken folders, bad call arguments - each as one UserError naming the fix."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

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


# --- broken diffusers folders: one UserError each, naming the problem and the fix ------------------------------
@pytest.fixture(scope="module")
def pipeline_folder(net, tmp_path_factory):
    """A DDPMPipeline folder of the tiny net (trained size 8x8, attention at 4x4), written by save_pretrained."""
    folder = tmp_path_factory.mktemp("pipeline") / "pipe"
    DDPMPipeline(net, SchedulerConfig()).save_pretrained(folder)
    return folder


def broken_copy(pipeline_folder, tmp_path, remove: str | None = None, edit: tuple[str, dict] | None = None,
                text: tuple[str, str] | None = None):
    """A copy of the folder with a file or folder removed, JSON fields changed/added, or a file's text replaced."""
    folder = tmp_path / "broken"
    shutil.copytree(pipeline_folder, folder)
    if remove:
        target = folder / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    if edit:
        path = folder / edit[0]
        path.write_text(json.dumps(json.loads(path.read_text()) | edit[1]))
    if text:
        (folder / text[0]).write_text(text[1])
    return folder


SCHEDULER, UNET = "scheduler/scheduler_config.json", "unet/config.json"
BROKEN_FOLDERS = {  # id: (how the folder is broken, the error class, the start of what the message must say)
    "no_scheduler_config": (dict(remove=SCHEDULER), FileNotFoundError,
                            r"scheduler_config.json not found: a pipeline folder needs "
                            "scheduler/scheduler_config.json"),
    "no_unet": (dict(remove="unet"), FileNotFoundError,
                r"unet/config.json not found \(no such folder\): a pipeline folder needs unet/config.json"),
    "no_unet_config": (dict(remove=UNET), FileNotFoundError, r"unet/config.json not found \(no config.json in it\)"),
    "no_unet_weights": (dict(remove="unet/diffusion_pytorch_model.safetensors"), FileNotFoundError,
                        r"no diffusion_pytorch_model.safetensors \(or diffusion_pytorch_model.bin\) in .*unet: "
                        "the U-Net's weights are missing"),
    "no_model_index": (dict(remove="model_index.json"), FileNotFoundError,
                       r"model_index.json not found: .* is not a diffusers pipeline folder"),
    "invalid_json": (dict(text=(SCHEDULER, '{"beta_start": 0.0001,')), ValueError,
                     r"scheduler_config.json is not valid JSON \(Expecting property name"),
    "unknown_scheduler_field": (dict(edit=(SCHEDULER, {"beta_shedule": "squaredcos_cap_v2"})), ValueError,
                                r"unknown field 'beta_shedule' \(did you mean 'beta_schedule'\?\); DDPMScheduler / "
                                r"DDIMScheduler has no such field, so diffusers ignores it"),
    "unknown_unet_field": (dict(edit=(UNET, {"attention_head_dims": 16})), ValueError,
                           r"unknown field 'attention_head_dims' \(did you mean 'attention_head_dim'\?\); "
                           "UNet2DModel has no such field"),
    "other_scheduler_class": (dict(edit=(SCHEDULER, {"_class_name": "PNDMScheduler"})), ValueError,
                              r"_class_name='PNDMScheduler' is not supported: diffusers would sample with "
                              "PNDMScheduler"),
    "variance_type": (dict(edit=(SCHEDULER, {"variance_type": "learned"})), ValueError,
                      r"scheduler variance_type='learned' is not supported; use one of: fixed_small, fixed_large, "
                      "learned_range"),
    "learned_range_needs_2c": (dict(edit=(SCHEDULER, {"variance_type": "learned_range"})), ValueError,
                               r"the U-Net has 1 output channels for 1-channel images, but the scheduler's "
                               r"variance_type='learned_range' needs 2"),
    "sample_size_not_divisible": (dict(edit=(UNET, {"sample_size": 9})), ValueError,
                                  r"sample_size=9 is not divisible by 2, the down-sampling factor of the 2 down "
                                  r"blocks; set it to the size the net was trained at, a multiple of 2 "
                                  r"\(e.g. 8 or 10\)"),
    "sample_size_not_trained": (dict(edit=(UNET, {"sample_size": 16})), ValueError,
                                r"sample_size=16, but these weights were trained at 8x8 \(self-attention at 4x4\); "
                                r"at 16 .* attention at 8x8.* Set \"sample_size\": 8 in config.json"),
    "in_channels": (dict(edit=(UNET, {"in_channels": 3})), ValueError,
                    r"in_channels=3, but the weights' conv_in has 1 channels; set \"in_channels\": 1"),
    "out_channels": (dict(edit=(UNET, {"out_channels": 3})), ValueError,
                     r"out_channels=3, but the weights' conv_out has 1 channels; set \"out_channels\": 1"),
    "multi_head_attention": (dict(edit=(UNET, {"attention_head_dim": 8})), ValueError,
                             r"attention_head_dim=8 splits the attention of width 64 into several heads.*set "
                             r"\"attention_head_dim\": null if the net was trained with one head"),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_a_broken_pipeline_folder_is_one_user_error_naming_the_fix(pipeline_folder, tmp_path, case):
    from diffusion_lab.errors import UserError

    breakage, builtin, message = BROKEN_FOLDERS[case]
    folder = broken_copy(pipeline_folder, tmp_path, **breakage)
    with pytest.raises(UserError, match=message) as caught:
        DDPMPipeline.from_pretrained(folder)
    assert isinstance(caught.value, builtin)  # except clauses written against the builtin type still catch it
    assert "\n" not in str(caught.value)  # one line under the CLI's "error: "


def test_what_diffusers_itself_writes_loads(pipeline_folder, net, tmp_path):
    """Every field diffusers writes (its current UNet2DModel / DDPMScheduler configs) is accepted, none dropped."""
    theirs = diffusers.DDPMPipeline.from_pretrained(pipeline_folder)
    theirs.save_pretrained(tmp_path / "theirs")
    written = set(json.loads((tmp_path / "theirs" / UNET).read_text()))
    assert {"mid_block_type", "downsample_type", "attn_norm_num_groups", "time_embedding_dim"} <= written
    assert "dynamic_thresholding_ratio" in json.loads((tmp_path / "theirs" / SCHEDULER).read_text())
    again = DDPMPipeline.from_pretrained(tmp_path / "theirs")
    assert again.scheduler == SchedulerConfig()
    for (name, ours), theirs_p in zip(net.state_dict().items(), again.unet.state_dict().values()):
        assert torch.equal(ours, theirs_p), name


def test_a_ddpm_scheduler_without_variance_type_means_diffusers_default(pipeline_folder, tmp_path):
    folder = broken_copy(pipeline_folder, tmp_path)
    raw = json.loads((folder / SCHEDULER).read_text())
    del raw["variance_type"]
    (folder / SCHEDULER).write_text(json.dumps(raw))
    assert diffusers.DDPMScheduler.from_config(raw).config.variance_type == "fixed_small"
    assert DDPMPipeline.from_pretrained(folder).scheduler.variance_type == "fixed_small"


@pytest.mark.parametrize("kwargs, message", [
    ({"output_type": "latent"}, r"output_type='latent' is not supported; allowed: pil, np, pt"),
    ({"batch_size": 0}, r"batch_size=0 must be an int >= 1"),
    ({"num_inference_steps": 0}, r"num_inference_steps=0 must be an int from 1 to 1000"),
    ({"num_inference_steps": 1001}, r"num_inference_steps=1001 must be an int from 1 to 1000"),
    ({"eta": -0.5}, r"eta=-0.5 must be a number >= 0"),
    ({"batch_size": 3, "generator": [torch.Generator()] * 2}, r"a list of 2 generators for a batch of 3 images"),
])
def test_pipeline_call_arguments_raise_user_errors(net, kwargs, message):
    from diffusion_lab.pipelines import PipelineArgumentError

    pipe = DDIMPipeline(net, SchedulerConfig())
    with pytest.raises(PipelineArgumentError, match=message) as caught:
        pipe(**({"num_inference_steps": 2} | kwargs))
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("case", ["no_scheduler_config", "sample_size_not_trained"])
def test_the_sample_command_prints_one_error_line_for_a_broken_folder(pipeline_folder, tmp_path, case):
    breakage, _, message = BROKEN_FOLDERS[case]
    folder = broken_copy(pipeline_folder, tmp_path, **breakage)
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.sample", f"ckpt={folder}", "num_images=1",
                             f"out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
