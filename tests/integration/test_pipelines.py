"""Pipelines (the diffusers call API), the diffusers folder format both ways, and the sample CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.nets import UNet
from diffusion_lab.pipelines import DDIMPipeline, DDPMPipeline, FormatError, SchedulerConfig, load_unet, save_unet
from tests.conftest import perturbed

diffusers = pytest.importorskip("diffusers")

# The configuration of google/ddpm-cifar10-32 (the converted original DDPM CIFAR-10 checkpoint).
DDPM_CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None, act_fn="silu", norm_num_groups=32,
    center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional", dropout=0.1,
)


def test_import_the_ddpm_cifar10_32_layout(tmp_path):
    theirs = perturbed(diffusers.UNet2DModel(**DDPM_CIFAR10_32))
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    assert sum(p.numel() for p in ours.parameters()) == 35_746_307
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 700])
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    # float32, 35.7M parameters, ~100 layers deep: agreement to 1e-4 of an output of scale ~1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_loads_in_diffusers(tmp_path):
    ours = perturbed(UNet(image_size=16, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                          attn_resolutions=(8,), dropout=0.0))
    save_unet(ours, tmp_path / "unet")
    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 999])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t).sample, ours(x, t), atol=1e-5, rtol=1e-5)


def test_unsupported_diffusers_configs_are_named(tmp_path):
    folder = tmp_path / "unet"
    save_unet(UNet(image_size=8, ch=32, ch_mult=(1,), attn_resolutions=()), folder)
    config = json.loads((folder / "config.json").read_text())
    config["flip_sin_to_cos"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="flip_sin_to_cos=True is not supported"):
        load_unet(folder)


@pytest.fixture(scope="module")
def small_pipeline():
    net = perturbed(UNet(image_size=8, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                         attn_resolutions=(4,), dropout=0.0), seed=3)
    return net


@pytest.mark.parametrize("cls", [DDPMPipeline, DDIMPipeline])
def test_pipeline_output_types_and_round_trip(cls, small_pipeline, tmp_path):
    pipe = cls(small_pipeline, SchedulerConfig())
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pil = pipe(batch_size=3, generator=g(), num_inference_steps=10)
    assert len(pil.images) == 3 and isinstance(pil.images[0], Image.Image) and pil.images[0].size == (8, 8)
    arr = pipe(batch_size=3, generator=g(), num_inference_steps=10, output_type="np").images
    assert arr.shape == (3, 8, 8, 3) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil.images[1]), (arr[1] * 255).round().astype(np.uint8))
    (tup,) = pipe(batch_size=3, generator=g(), num_inference_steps=10, output_type="np", return_dict=False)
    np.testing.assert_array_equal(tup, arr)
    with pytest.raises(ValueError, match="allowed: pil, np, pt"):
        pipe(output_type="latent", num_inference_steps=2)

    pipe.save_pretrained(tmp_path / "pipe")
    again = cls.from_pretrained(tmp_path / "pipe")
    np.testing.assert_array_equal(again(batch_size=3, generator=g(), num_inference_steps=10, output_type="np").images, arr)
    # diffusers' own pipeline loads the folder and draws the same images from the same generator (its float32
    # schedule vs our float64 one: measured differences up to 1.7e-4 with this random network)
    theirs = getattr(diffusers, cls.__name__).from_pretrained(tmp_path / "pipe")
    theirs.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(theirs(batch_size=3, generator=g(), num_inference_steps=10, output_type="np").images,
                               arr, atol=1e-3)


def test_pipeline_to_device_and_ddim_eta(small_pipeline, tmp_path):
    """eta reaches the sampler: the pipeline's images are DDIMSampler's with that eta (to float32 rounding), and
    diffusers' DDIMPipeline on the same folder and generator draws the same ones at eta=0 and at eta=1."""
    from diffusion_lab.samplers import DDIMSampler

    pipe = DDIMPipeline(small_pipeline, SchedulerConfig()).to("cpu")
    assert pipe.device.type == "cpu"
    pipe.save_pretrained(tmp_path / "pipe")
    theirs = diffusers.DDIMPipeline.from_pretrained(tmp_path / "pipe")
    theirs.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = {}
    for eta in (0.0, 1.0):
        images[eta] = pipe(batch_size=2, generator=g(), eta=eta, num_inference_steps=10, output_type="np").images
        sampler = DDIMSampler(num_steps=10, spacing="leading", eta=eta, clip_denoised=True)
        direct = sampler.sample(small_pipeline, pipe.diffusion, (2, 3, 8, 8), generator=g(), device="cpu")
        expected = (direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(images[eta], expected, atol=1e-6, rtol=0)
        # float32 schedule there, float64 here: up to ~2e-4 apart with this random network
        np.testing.assert_allclose(theirs(batch_size=2, generator=g(), eta=eta, num_inference_steps=10,
                                          output_type="np").images, images[eta], atol=1e-3, rtol=0)
    assert np.abs(images[0.0] - images[1.0]).max() > 0.05  # so the 1e-3 agreement above tells them apart


def test_pipeline_from_training_checkpoint_uses_ema(digits_checkpoint):
    from diffusion_lab.training.checkpoints import load_module

    module = load_module(digits_checkpoint)
    pipe = DDPMPipeline.from_checkpoint(digits_checkpoint)
    assert torch.equal(pipe.unet.conv_in.weight, module.ema.module.conv_in.weight)
    raw = DDPMPipeline.from_checkpoint(digits_checkpoint, use_ema=False)
    assert torch.equal(raw.unet.conv_in.weight, module.net.conv_in.weight)
    images = pipe(batch_size=2, num_inference_steps=20, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


@pytest.mark.parametrize("args", [["sampler=ddpm", "sampler.num_steps=50"], ["sampler=ddim", "sampler.num_steps=20"],
                                  ["sampler=dpm_solver", "sampler.num_steps=10"]], ids=["ddpm", "ddim", "dpm_solver"])
def test_sample_cli_on_a_trained_checkpoint(digits_checkpoint, tmp_path, args):
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.sample", f"ckpt={digits_checkpoint}",
                             "num_images=10", "batch_size=4", f"out={out}", *args],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list((out / "images").glob("*.png"))) == 10 and (out / "grid.png").is_file()
    record = json.loads((out / "sampling.json").read_text())
    assert record["nfe"] == int(args[1].split("=")[1]) and record["num_images"] == 10
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((out / "images").glob("*.png"))])
    assert images.shape == (10, 8, 8) and images.std() > 5  # finite, in range, not blank
