"""One loader for a trained model: a training checkpoint (``last.ckpt``) or a diffusers-layout folder ->
:class:`LoadedModel` (net, diffusion, training config, sampler, sha256). Used by ``diffusion-lab-sample``,
``diffusion-lab-eval`` and ``DiffusionPipeline.from_checkpoint``; each reads the checkpoint once.

Also the sampling-time precision of a net (:func:`sampling_net`): autocast around the network call only, so a
sampler's own arithmetic (alpha-bars, the x update) stays in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import CheckpointNotFoundError, UserError

PRECISIONS = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class PrecisionError(UserError, ValueError):
    """An unknown ``precision=`` value."""


@dataclasses.dataclass
class LoadedModel:
    """What sampling and evaluation need from a trained model, and what identifies it."""

    net: nn.Module          # in eval mode; the EMA weights unless use_ema=False
    diffusion: GaussianDiffusion
    config: dict[str, Any] | None  # the resolved training config (None for a diffusers folder)
    sampler: Any            # the sampler the run trained with (None for a diffusers folder)
    path: Path
    sha256: str             # of the file's bytes (of every file, in sorted order, for a folder)
    use_ema: bool


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files in sorted relative-path order (names included)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedModel:
    """A training checkpoint (EMA weights unless ``use_ema=False``) or a diffusers folder, on ``device``."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        from diffusion_lab.pipelines import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path).to(device)
        return LoadedModel(pipe.unet.eval(), pipe.diffusion, None, None, path, file_sha256(path), use_ema)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"ckpt={str(path)!r} is neither a checkpoint file nor a pipeline folder (with model_index.json); "
            "give a training run's checkpoints/last.ckpt or a folder written by save_pretrained")
    from diffusion_lab.training.checkpoints import load_module

    module = load_module(path, map_location=device)
    net = (module.ema_net if use_ema else module.net).eval()
    return LoadedModel(net, module.diffusion, module.run_config, module.sampler, path, file_sha256(path), use_ema)


class SamplingNet(nn.Module):
    """``net(x, t)`` under autocast to ``dtype`` (None: as is), its output cast back to x's dtype.

    Samplers call the network through this and do everything else in x's dtype (float32): mixed precision
    touches only the network's matrix products, as in training with ``precision=bf16-mixed``.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype | None = None, compile: bool = False) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype
        self.forward_fn = torch.compile(net) if compile else net
        self.config = getattr(net, "config", None)
        self._warned = False

    def forward(self, x: Tensor, t: Tensor, *class_labels: Tensor) -> Tensor:
        if self.dtype is None:
            return self.forward_fn(x, t, *class_labels).to(x.dtype)
        if x.device.type == "cpu" and not self._warned:
            self._warned = True
            warn_slow_cpu_autocast(self.dtype)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.forward_fn(x, t, *class_labels)
        return out.to(x.dtype)


def warn_slow_cpu_autocast(dtype: torch.dtype) -> None:
    """Warn when low-precision autocast runs on a CPU without native bf16/fp16 kernels (it is slower there)."""
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if not native:
        warnings.warn(
            f"precision={'bf16' if dtype == torch.bfloat16 else '16'}-mixed on a CPU without native "
            f"{dtype} kernels ({torch.backends.cpu.get_cpu_capability()}): the convolutions fall back to slow "
            "generic code (digits U-Net on an AVX2 CPU: 7-14x slower than fp32). Use precision=32 on this machine; "
            "low precision pays off on GPUs and on CPUs with AVX512-BF16/AMX.",
            stacklevel=3,
        )


def sampling_net(net: nn.Module, precision: str = "32", compile: bool = False) -> nn.Module:
    """``net`` for sampling at ``precision`` (32 | bf16-mixed | 16-mixed), optionally ``torch.compile``d."""
    precision = str(precision)
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision={precision!r} is not supported; allowed: 32, bf16-mixed, 16-mixed")
    return SamplingNet(net, PRECISIONS[precision], compile).eval()
