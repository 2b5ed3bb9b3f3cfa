"""Rebuilding a trained module from a checkpoint, instantiating only what is safe.

Safety: a checkpoint from the internet must not run code. The file is read by
:func:`~diffusion_lab.training.checkpoint_io.load_checkpoint` (``torch.load(weights_only=True)``, re-exported here
for the callers that import it from this module); :func:`load_module` instantiates only this project's classes and
the torch optimizers / LR schedulers named in the config stored inside the checkpoint (:func:`check_targets`).
Finding and checking the checkpoint to resume from lives in :mod:`diffusion_lab.training.resume`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from diffusion_lab.errors import CheckpointError
from diffusion_lab.training.checkpoint_io import first_line as _first_line
from diffusion_lab.training.checkpoint_io import load_checkpoint

__all__ = ["ALLOWED_TARGET_PREFIXES", "check_targets", "checkpoint_config", "load_checkpoint", "load_module"]


# --- what a checkpoint's config may instantiate --------------------------------------------------------
# Module prefixes checked as strings *before* anything is imported (an import can run code).
ALLOWED_TARGET_PREFIXES = ("diffusion_lab.", "torch.optim.")


def _allowed_object(obj: Any) -> bool:
    """This project's networks, diffusion, samplers, LightningModule and LR-schedule functions; torch optimizers and
    LR schedulers. A diffusion_lab *function* other than an LR schedule (e.g. a file writer) is not allowed."""
    import inspect

    import lightning as L

    from diffusion_lab.diffusion.gaussian import GaussianDiffusion
    from diffusion_lab.samplers.base import Sampler
    from diffusion_lab.training import warmup

    module = getattr(obj, "__module__", "") or ""
    if inspect.isclass(obj):
        if module.startswith("diffusion_lab."):
            return issubclass(obj, (torch.nn.Module, L.LightningModule, GaussianDiffusion, Sampler))
        return issubclass(obj, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler))
    return inspect.isfunction(obj) and module == warmup.__name__


def _targets(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield child, value
            else:
                yield from _targets(value, child)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _targets(item, f"{path}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield path, node  # an interpolation: a resolved config never holds one


def check_targets(config: Mapping[str, Any], source: str | Path) -> None:
    """Refuse a checkpoint config that names anything but this project's classes and torch optimizers/schedulers.

    Raises :class:`CheckpointError` before any of it is imported or called.
    """
    from hydra.utils import get_object

    for key, target in _targets(config, ""):
        if not key.endswith("_target_"):
            raise CheckpointError(f"refusing {source}: its config has an interpolation at {key}={target!r}; "
                                  "a checkpoint written by diffusion-lab-train holds a resolved config")
        if not isinstance(target, str) or not target.startswith(ALLOWED_TARGET_PREFIXES):
            raise CheckpointError(
                f"refusing {source}: its config names {key}={target!r}, which is not one of this project's classes "
                f"(allowed: {', '.join(p + '*' for p in ALLOWED_TARGET_PREFIXES)} networks, samplers, optimizers and "
                "LR schedules); use a checkpoint written by diffusion-lab-train from a source you trust"
            )
        try:
            obj = get_object(target)
        except Exception as error:  # noqa: BLE001 - hydra raises several types
            raise CheckpointError(f"{source}: its config names {key}={target!r}, which cannot be imported "
                                  f"({_first_line(error)}); was it written by another diffusion_lab version?") from None
        if not _allowed_object(obj):
            raise CheckpointError(
                f"refusing {source}: its config names {key}={target!r}, which is not a network, diffusion, sampler, "
                "optimizer or LR schedule; use a checkpoint written by diffusion-lab-train from a source you trust"
            )


def checkpoint_config(checkpoint: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """The resolved run config training stored in the checkpoint (with its targets checked)."""
    config = (checkpoint.get("diffusion_lab") or {}).get("config")
    if not isinstance(config, dict) or not all(k in config for k in ("model", "diffusion")):
        raise CheckpointError(f"{source} was not written by diffusion_lab training (no run config inside); "
                              "give a checkpoint written by diffusion-lab-train")
    check_targets({k: config.get(k) for k in ("model", "diffusion", "sampler")}, source)
    return config


def load_module(path: str | Path, map_location: Any = "cpu", sampler: Any = None):
    """Rebuild the :class:`DiffusionModule` a training run saved (net, EMA, diffusion, sampler) from a checkpoint."""
    from hydra.utils import instantiate

    checkpoint = load_checkpoint(path, "cpu")
    config = checkpoint_config(checkpoint, path)
    if str((config.get("model") or {}).get("_target_", "")).endswith(".DistillationModule"):
        raise CheckpointError(f"{path} is a distillation run's own checkpoint (it resumes that run with ckpt_path=...); "
                              "sample, evaluate or distil further one of its students: "
                              f"{Path(path).parent}/student_<N>steps.ckpt")
    diffusion = instantiate(config["diffusion"])
    sampler = sampler if sampler is not None else instantiate(config["sampler"])
    module = instantiate(config["model"], _partial_=True)(diffusion=diffusion, sampler=sampler)
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: its weights do not fit the model its own config describes "
                              f"({_first_line(error)}); the file is corrupted") from None
    module.run_config = config
    return module.to(map_location).eval()
