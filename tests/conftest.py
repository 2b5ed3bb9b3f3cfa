"""Shared fixtures: offline environment, composing the real configs with tiny overrides, small data sets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import pytest
import torch

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from diffusion_lab.nets import UNet

# No network in tests: every hub access must fail fast rather than hang.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# The digits classifier and reference statistics are cached per test session, not in the user's home.
import tempfile  # noqa: E402

os.environ.setdefault("DIFFUSION_LAB_CACHE", tempfile.mkdtemp(prefix="diffusion_lab_cache_"))

# OMP_NUM_THREADS, when set, decides (as for the commands): e.g. 1 on a busy machine, where 2 threads spin.
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A small net and a short schedule so one training step and one sample grid take well under a second.
TINY = [
    "model.net.ch=32",
    "model.net.ch_mult=[1,2]",
    "model.net.num_res_blocks=1",
    "model.net.attn_resolutions=[4]",
    "data.limit=64",
    "data.batch_size=16",
    "sampler=ddim",
    "sampler.num_steps=5",
    "callbacks.sample_grid.num_images=4",
    "callbacks.fid.num_samples=64",
    "callbacks.fid.batch_size=64",
    "callbacks.fid.on_train_end=false",
    "callbacks.fid.extra_samplers.ddim50.num_steps=5",
    "~callbacks.progress_bar",
    "~callbacks.model_summary",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def compose_config(name: str, overrides: Iterable[str] = (), hydra: bool = False) -> DictConfig:
    """The shipped ``name`` config ("train", "sample" or "eval") with ``overrides``, composed as its CLI does.

    ``hydra=True`` keeps the ``hydra`` node (run folder, choices), which :func:`use_run_dir` needs. Hydra's
    global state is left cleared, so one test's composition cannot leak into the next."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
            return compose(name, overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def use_run_dir(cfg: DictConfig, run_dir: Path, log_dir: Path, data_dir: Path | None = None) -> DictConfig:
    """Point a composed train config (``hydra=True``) at ``run_dir`` as a real run would be: ``paths.output_dir``
    resolves through HydraConfig, ``ckpt_path=last`` searches ``log_dir``; ``data_dir`` keeps downloads in tmp."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.paths.log_dir = str(log_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable:
    """compose_cfg(overrides, run_dir=None, tiny=True) -> the real train config (TINY first unless tiny=False),
    its run folder ``run_dir`` or tmp_path/runs/<experiment>/run."""

    def _compose(overrides: Iterable[str] = (), run_dir: Path | None = None, tiny: bool = True) -> DictConfig:
        cfg = compose_config("train", (TINY if tiny else []) + list(overrides), hydra=True)
        out = Path(run_dir or tmp_path / "runs" / str(cfg.hydra.runtime.choices.experiment) / "run")
        return use_run_dir(cfg, out, log_dir=out.parent.parent, data_dir=tmp_path / "data")

    return _compose


def fit_steps(compose_cfg: Callable, overrides: Iterable[str], steps: int, *callbacks):
    """``steps`` real training steps of the composed config (data, module and trainer groups; the seed set to 0), with
    ``callbacks`` and no logger or checkpoints. Returns (module, trainer)."""
    from hydra.utils import instantiate

    cfg = compose_cfg([f"trainer.max_steps={steps}", *overrides])
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, _partial_=True)(diffusion=instantiate(cfg.diffusion), sampler=None)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (the output convolutions start at scale 1e-10 and would hide any
    mapping error or difference between nets)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def tiny_unet(perturb: float = 0.0, **overrides) -> UNet:
    """The test suite's small U-Net: 1-channel 8x8 images, width 32, one level, one residual block, no attention;
    ``overrides`` are UNet arguments (e.g. ``out_channels=2``, ``ch_mult=(1, 2)``).

    ``perturb`` adds N(0, perturb^2) noise (torch's global generator) to every weight: the output convolutions
    start at scale 1e-10, so an unperturbed net predicts ~0 whatever its input."""
    from diffusion_lab.nets import UNet

    kwargs = dict(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1,
                  attn_resolutions=())
    net = UNet(**(kwargs | overrides))
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p) * perturb)
    return net


def eval_command(ckpt: Path, out: Path, data_dir: Path, *overrides: str) -> list[str]:
    """``diffusion-lab-eval`` on ``ckpt`` writing its report to ``out``, reference statistics under ``data_dir``."""
    import sys

    return [sys.executable, "-m", "diffusion_lab.cli.evaluate", f"ckpt={ckpt}", f"out={out}",
            f"paths.data_dir={data_dir}", *overrides]


def make_images(n: int, size: tuple[int, int], mode: str = "RGB", seed: int = 0):
    """n random PIL images (a deterministic mix of gradients and noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    images = []
    for _ in range(n):
        array = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        images.append(Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode))
    return images


@pytest.fixture
def hf_cifar_like(tmp_path: Path) -> Path:
    """A local `datasets` data set with CIFAR-10's schema (img: Image, label: ClassLabel), saved to disk."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    ds = datasets.Dataset.from_dict(
        {"img": make_images(12, (32, 32)), "label": [i % 10 for i in range(12)]}, features=features
    )
    path = tmp_path / "cifar10_local"
    ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory):
    """A short real digits run (the trained checkpoint every sampler is tried on)."""
    from diffusion_lab.cli.train import train

    out = tmp_path_factory.mktemp("digits_run")
    cfg = compose_config("train", TINY + ["trainer.max_steps=60", "callbacks.sample_grid.every_n_steps=0"], hydra=True)
    train(use_run_dir(cfg, out, log_dir=out.parent))
    return out / "checkpoints" / "last.ckpt"


def poison_loss(monkeypatch, at_call: int) -> dict[str, int]:
    """Make the ``at_call``-th call of the training objective (1-based) return NaN losses: a NaN step on demand.

    Returns the call counter (``{"n": calls so far}``)."""
    from diffusion_lab.diffusion.losses import Objective

    original, calls = Objective.__call__, {"n": 0}

    def poisoned(self, denoiser, x0, cond=None, generator=None):
        calls["n"] += 1
        per_example, t = original(self, denoiser, x0, cond, generator)
        return (per_example * float("nan") if calls["n"] == at_call else per_example), t

    monkeypatch.setattr(Objective, "__call__", poisoned)
    return calls
