"""Finding checkpoints to resume from, and rebuilding a trained module from one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
            raise FileNotFoundError(
                f"ckpt_path=last, but no earlier run of {task_name!r} has a checkpoints/last.ckpt under {task_dir}; "
                "start without ckpt_path, or give a run folder or .ckpt file"
            )
        return str(max(candidates, key=lambda p: p.stat().st_mtime))
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return str(candidate)
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} is a folder without checkpoints/last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist; use 'last', a run folder or a .ckpt file")
    return str(path)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)


def load_module(path: str | Path, map_location: Any = "cpu", sampler: Any = None):
    """Rebuild the :class:`DiffusionModule` a training run saved (net, EMA, diffusion, sampler) from a checkpoint."""
    from hydra.utils import instantiate

    checkpoint = load_checkpoint(path, map_location)
    config = (checkpoint.get("diffusion_lab") or {}).get("config")
    if config is None:
        raise ValueError(f"{path} was not written by diffusion_lab training (no 'diffusion_lab' config inside)")
    diffusion = instantiate(config["diffusion"])
    sampler = sampler if sampler is not None else instantiate(config["sampler"])
    module = instantiate(config["model"], _partial_=True)(diffusion=diffusion, sampler=sampler)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = config
    return module.to(map_location).eval()
