"""Finding checkpoints to resume from, loading them safely, and rebuilding a trained module from one.

Safety: a checkpoint from the internet must not run code. Every checkpoint this project writes holds only
tensors and plain values, so :func:`load_checkpoint` reads with ``torch.load(weights_only=True)`` and refuses
anything else; :func:`load_module` instantiates only this project's classes and the torch optimizers / LR
schedulers named in the config stored inside the checkpoint (:func:`check_targets`).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from diffusion_lab.errors import CheckpointError, CheckpointNotFoundError


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | Path, task_name: str, current_run: str | Path) -> str | None:
    """Turn the ``ckpt_path`` config value into a checkpoint file (or None for a fresh run).

    - ``last``: the newest ``checkpoints/last.ckpt`` among earlier runs of ``task_name`` under ``log_dir``;
    - a run folder: its ``checkpoints/last.ckpt``;
    - a file: itself.
    """
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        task_dir = Path(log_dir) / task_name
        current = Path(current_run).resolve()
        candidates = [
            p for p in task_dir.glob("*/checkpoints/last.ckpt") if p.parent.parent.resolve() != current
        ]
        if not candidates:
            raise CheckpointNotFoundError(
                f"ckpt_path=last, but no earlier run of {task_name!r} has a checkpoints/last.ckpt under {task_dir}; "
                "start without ckpt_path, or give a run folder or .ckpt file"
            )
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise CheckpointNotFoundError(f"ckpt_path={ckpt_path!r} is a folder without checkpoints/last.ckpt")
    if not path.is_file():
        raise CheckpointNotFoundError(f"ckpt_path={ckpt_path!r} does not exist; use 'last', a run folder or a .ckpt file")
    return str(path)


# --- safe loading --------------------------------------------------------------------------------------
_ZIP_MAGIC = b"PK\x03\x04"


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)``: tensors and plain values only.

    Raises :class:`CheckpointError` with one message naming the problem and the fix for a missing, truncated,
    non-checkpoint (text, random bytes) or unsafe (pickled Python objects) file; nothing in the file is run.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist; give a .ckpt file written by training")
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); use another checkpoint, e.g. a step_*.ckpt")
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({path.stat().st_size:,} bytes; its zip index is "
            "missing, as after an interrupted copy or save); copy it again or use another checkpoint, e.g. a step_*.ckpt"
        )
    if not head.startswith(_ZIP_MAGIC) and not head.startswith(b"\x80"):  # neither torch's zip nor a pickle
        kind = "a text file" if _looks_like_text(head) else "not a PyTorch checkpoint (unknown bytes)"
        raise CheckpointError(f"checkpoint {path} is {kind}; give a .ckpt file written by diffusion-lab-train")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"unsupported (GLOBAL \S+|global \S+|class \S+)", str(error), re.IGNORECASE)
        if unsafe:
            what = f" ({unsafe.group(1)})"
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects{what}, which could run code. "
                "diffusion_lab checkpoints hold only tensors and plain values; use a checkpoint written by "
                "diffusion-lab-train from a source you trust"
            ) from None
        if not head.startswith(_ZIP_MAGIC):
            raise CheckpointError(
                f"refusing to load {path}: it is a raw Python pickle, not a checkpoint written by torch.save, and "
                "unpickling it could run code; use a checkpoint written by diffusion-lab-train from a source you trust"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted or not a PyTorch checkpoint ({_first_line(error)}); "
                              "use another checkpoint") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({_first_line(error)}); copy it again or use another "
            "checkpoint, e.g. a step_*.ckpt"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning training checkpoint (no 'state_dict'); "
                              "give a .ckpt file written by diffusion-lab-train")
    return checkpoint


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


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


# --- resuming with a different config --------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: node}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``['model.net.ch: 32 in the checkpoint, 64 now', ...]`` over the given top-level sections."""
    a = _flatten({k: old.get(k) for k in sections})
    b = _flatten({k: new.get(k) for k in sections})
    missing = object()
    return [
        f"{key}: {a.get(key, 'unset')!s} in the checkpoint, {b.get(key, 'unset')!s} now"
        for key in sorted(set(a) | set(b))
        if a.get(key, missing) != b.get(key, missing)
    ]


def check_resume_compatible(checkpoint: Mapping[str, Any], module: torch.nn.Module, run_config: Mapping[str, Any],
                            source: str | Path) -> None:
    """Refuse to resume when the checkpoint's weights do not fit ``module``, naming the config values that differ."""
    own = module.state_dict()
    theirs = checkpoint["state_dict"]
    mismatched = sorted(
        k for k in set(own) | set(theirs)
        if k not in own or k not in theirs or tuple(own[k].shape) != tuple(theirs[k].shape)
    )
    if not mismatched:
        return
    old = (checkpoint.get("diffusion_lab") or {}).get("config") or {}
    differences = [d for d in config_differences(old, run_config, ("model", "diffusion")) if ".optimizer." not in d
                   and ".lr_scheduler." not in d]
    what = "; ".join(differences[:8]) if differences else f"{len(mismatched)} tensors differ, e.g. {mismatched[0]}"
    raise CheckpointError(
        f"cannot resume from {source}: it was trained with a different model config ({what}). Resume with the "
        "checkpoint's values (its run folder's config.yaml has them), or start a fresh run without ckpt_path"
    )
