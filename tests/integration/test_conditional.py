"""Class-conditional training with classifier-free guidance, end to end on a tiny digits model (issue 18):
experiment=digits_cond trains, the pipelines take diffusers' ``class_labels`` / ``guidance_scale``, a diffusers
folder keeps the classes, and diffusion-lab-sample draws the requested classes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.pipelines import DDIMPipeline, DDPMPipeline
from diffusion_lab.pipelines.pipeline import PipelineArgumentError
from diffusion_lab.samplers import DDIMSampler
from diffusion_lab.training.checkpoints import load_module
from tests.conftest import TINY, compose_config, use_run_dir


@pytest.fixture(scope="module")
def cond_checkpoint(tmp_path_factory):
    from diffusion_lab.cli.train import train

    out = tmp_path_factory.mktemp("digits_cond_run")
    tiny = [o for o in TINY if not o.startswith("callbacks.fid.")]  # digits_cond has no DDIM-50 extra FID
    cfg = compose_config("train", tiny + ["experiment=digits_cond", "trainer.max_steps=20", "callbacks.fid=null",
                                          "callbacks.sample_grid.every_n_steps=0",
                                          "callbacks.sample_grid.on_train_end=false"], hydra=True)
    train(use_run_dir(cfg, out, log_dir=out.parent))
    return out / "checkpoints" / "last.ckpt"


def test_a_conditional_run_has_the_class_embedding_and_drops_labels_at_p_uncond(cond_checkpoint):
    module = load_module(cond_checkpoint)
    assert module.net.config.num_classes == 10 and module.p_uncond == 0.1
    assert module.ema_net.class_embedding.weight.shape[0] == 11  # 10 digits and the null class
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20000,))
    dropped = (module.condition(labels).class_labels == 10).float().mean().item()
    assert dropped == pytest.approx(0.1, abs=0.006)  # binomial sd sqrt(0.09 / 20000) = 0.0021


def test_the_pipelines_take_class_labels_and_guidance_scale_as_diffusers(cond_checkpoint, tmp_path):
    pipe = DDIMPipeline.from_checkpoint(cond_checkpoint)
    labels = [0, 3, 7]
    out = pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 8, 8, 1) and out.images.dtype == np.float32
    assert 0 <= out.images.min() and out.images.max() <= 1
    # the same draw through the sampler and the denoiser directly, in [0, 1] as the pipeline returns it
    module = load_module(cond_checkpoint)
    direct = DDIMSampler(num_steps=5, clip_denoised=pipe.scheduler.clip_sample).sample(
        Denoiser(module.ema_net.eval(), module.diffusion), None, (3, 1, 8, 8),
        generator=torch.Generator().manual_seed(0), cond=Condition(torch.tensor(labels), 2.0))
    np.testing.assert_allclose(out.images, (direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)
    # guidance changes the images; a saved diffusers folder keeps the classes and gives the same images
    plain = pipe(class_labels=labels, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0))
    assert not np.allclose(plain.images, out.images)
    pipe.save_pretrained(tmp_path / "folder")
    again = DDIMPipeline.from_pretrained(tmp_path / "folder")(class_labels=labels, guidance_scale=2.0,
                                                               num_inference_steps=5, output_type="np",
                                                               generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(again.images, out.images, atol=1e-6)
    with pytest.raises(PipelineArgumentError, match="one image is drawn per label"):
        pipe(batch_size=2, class_labels=labels, num_inference_steps=2)
    with pytest.raises(PipelineArgumentError, match="class indices from 0 to 9"):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(PipelineArgumentError, match="needs class_labels"):
        pipe(guidance_scale=3.0, num_inference_steps=2)


def test_an_unconditional_pipeline_refuses_class_labels(digits_checkpoint):
    with pytest.raises(PipelineArgumentError, match="this U-Net is unconditional"):
        DDPMPipeline.from_checkpoint(digits_checkpoint)(class_labels=[1], num_inference_steps=2)


def test_the_sample_command_draws_the_requested_classes(cond_checkpoint, tmp_path):
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.sample", f"ckpt={cond_checkpoint}",
                             "class_labels=[2,5]", "images_per_label=2", "guidance_scale=1.5", "num_images=4",
                             "sampler=ddim", "sampler.num_steps=4", f"out={out}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "sampling.json").read_text())
    assert record["class_labels"] == [2, 5] and record["guidance_scale"] == 1.5 and record["images_per_label"] == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
    # images_per_label=2: classes 2, 2, 5, 5, each image from the noise of (seed 0, its index)
    from PIL import Image

    from diffusion_lab.utils.images import to_uint8

    module = load_module(cond_checkpoint)
    direct = DDIMSampler(num_steps=4).sample(Denoiser(module.ema_net.eval(), module.diffusion), None, (4, 1, 8, 8),
                                             seed=0, indices=[0, 1, 2, 3], cond=Condition(torch.tensor([2, 2, 5, 5]), 1.5))
    saved = np.stack([np.array(Image.open(out / "images" / f"{i:06d}.png")) for i in range(4)])
    np.testing.assert_array_equal(saved, to_uint8(direct)[:, 0].numpy())


def test_a_checkpoint_from_before_conditioning_loads_samples_and_resumes(digits_checkpoint, compose_cfg, tmp_path):
    """The layout written before this change: no model.net.num_classes in the stored config (the key did not
    exist), the same state_dict keys. It must rebuild the same net, sample the same images and resume."""
    from diffusion_lab.cli.train import train
    from diffusion_lab.training.checkpoint_io import load_checkpoint

    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    del checkpoint["diffusion_lab"]["config"]["model"]["net"]["num_classes"]
    old = tmp_path / "before.ckpt"
    torch.save(checkpoint, old)
    new_module, old_module = load_module(digits_checkpoint), load_module(old)
    assert old_module.net.config.num_classes is None and not any("class" in k for k in old_module.state_dict())
    sampler = DDIMSampler(num_steps=4)
    assert torch.equal(old_module.sample(3, sampler, torch.Generator().manual_seed(1)),
                       new_module.sample(3, sampler, torch.Generator().manual_seed(1)))
    step = checkpoint["global_step"]
    cfg = compose_cfg([f"ckpt_path={old}", f"trainer.max_steps={step + 2}", "callbacks.fid=null",
                       "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false"])
    train(cfg)
    from pathlib import Path

    assert load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")["global_step"] == step + 2


def test_eval_has_a_guidance_axis_with_class_accuracy(cond_checkpoint, tmp_path):
    """Each (sampler, w) cell is scored; class accuracy is the digits classifier's argmax against label i mod 10
    of the very images the sampler draws; the report has the guidance tables and the FID-vs-accuracy plot, and
    a rerun resumes every cell."""
    from PIL import Image

    from diffusion_lab.metrics.extractors import make_extractor
    from diffusion_lab.metrics.fidelity import extract
    from diffusion_lab.utils.images import to_uint8
    from tests.conftest import eval_command

    out = tmp_path / "eval"
    args = eval_command(cond_checkpoint, out, tmp_path / "data", "num_samples=40", "batch_size=16",
                        "grid.samplers=[{sampler: ddim, eta: 0.0}]", "grid.steps=[4]", "grid.guidance_scale=[1,3]",
                        "metrics.kid=false",
                        "metrics.prc=false", "metrics.isc_splits=2", "metrics.fid_bootstrap=0")
    first = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    cells = {c["guidance_scale"]: c for c in report["cells"]}
    assert sorted(cells) == [1.0, 3.0]
    assert cells[3.0]["class_labels"] == "uniform: image i is drawn for class i mod 10"
    module = load_module(cond_checkpoint)
    extractor = make_extractor("digits-classifier")
    labels = torch.arange(40) % 10
    for w, cell in cells.items():
        images = DDIMSampler(num_steps=4).sample(Denoiser(module.ema_net.eval(), module.diffusion), None,
                                                  (40, 1, 8, 8), seed=0, indices=list(range(40)),
                                                  cond=Condition(labels, w))
        _, logits = extract(extractor, [to_uint8(images)], "cpu")
        assert cell["metrics"]["class_accuracy"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    table = (out / "report.md").read_text()
    assert "## Classifier-free guidance" in table and "| sampler, S \\ w | 1 | 3 |" in table
    assert "| DDIM eta=0, 4 |" in table and "### Class accuracy" in table
    with Image.open(out / "fid_vs_accuracy.png") as plot:
        assert plot.format == "PNG"
    second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert second.returncode == 0 and "resuming: 2 finished cells" in second.stderr + second.stdout
    assert len(json.loads((out / "report.json").read_text())["cells"]) == 2


def test_the_training_callbacks_draw_every_class(cond_checkpoint, tmp_path):
    """The FID callback's images are drawn for class i mod 10 (and scored for class accuracy); the grid has
    one row per class."""
    from types import SimpleNamespace

    from diffusion_lab.callbacks import SampleGrid
    from diffusion_lab.metrics.evaluate import generate_features
    from diffusion_lab.metrics.extractors import make_extractor

    module = load_module(cond_checkpoint)
    sampler = DDIMSampler(num_steps=3)
    extractor = make_extractor("digits-classifier")
    _, _, images = generate_features(module.ema_net, module.diffusion, sampler, [3, 4, 15], extractor,
                                     keep_images=3, guidance_scale=2.0)
    direct = sampler.sample(Denoiser(module.ema_net.eval(), module.diffusion), None, (3, 1, 8, 8), seed=0,
                            indices=[3, 4, 15], cond=Condition(torch.tensor([3, 4, 5]), 2.0))
    assert torch.equal(images, direct)
    count, cond, per_row = SampleGrid(str(tmp_path), num_images=64, guidance_scale=2.0).layout(module)
    assert (count, per_row) == (60, 6) and cond.guidance_scale == 2.0
    assert cond.class_labels.tolist() == [c for c in range(10) for _ in range(6)]
    unconditional = SimpleNamespace(net=SimpleNamespace(config=SimpleNamespace(num_classes=None)))
    with pytest.raises(ValueError, match="callbacks.sample_grid.guidance_scale=2 needs a class-conditional model"):
        SampleGrid(str(tmp_path), guidance_scale=2.0).layout(unconditional)
