"""The checkpoint file format: crash-safe writes, and safe reads (tensors and plain values only).

Writes: Lightning's own ``_atomic_save`` goes through an fsspec transaction whose temporary file lives in the system
temp folder; when ``TMPDIR`` is on another filesystem than the run folder the final move is a copy, and a kill during
it leaves a truncated ``last.ckpt`` in place of the good one. Here the temporary file lives in the destination
folder itself, is flushed and fsync'ed, and only then renamed over the target with ``os.replace`` (atomic on
POSIX and Windows within one filesystem): a reader sees the old file or the new one, never a piece.

Reads: a checkpoint from the internet must not run code. Every checkpoint this project writes holds only tensors
and plain values, so :func:`load_checkpoint` reads with ``torch.load(weights_only=True)`` and refuses anything else.

Besides Lightning's keys, a checkpoint holds ``diffusion_lab``: ``{"config": <the resolved run config>, "health":
{"step", "weight_norm", "loss"}}`` (written by the LightningModule; :func:`checkpoint_health` reads it).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.errors import CheckpointError, CheckpointNotFoundError
from diffusion_lab.utils.io import TEMP_MARK, atomic_open

log = logging.getLogger(__name__)


# --- writing ---------------------------------------------------------------------------------------------
def temp_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"*{TEMP_MARK}*") if p.is_file()) if folder.is_dir() else []


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the partial files a killed save left in ``folder``; returns what was removed."""
    removed = []
    for path in temp_files(folder):
        pid = path.name.split(TEMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another live process is writing it right now
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("Removed %d partial checkpoint file(s) left by an interrupted save in %s", len(removed), folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomic(payload: Any, path: str | Path) -> None:
    """``torch.save(payload, path)`` through a temp file in the same folder, fsync, then ``os.replace``."""
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic in the destination folder (see the module docstring).

    The first save into a folder also removes partial files an earlier killed save left there. ``saved`` maps each
    file this run wrote to the health record of its latest content, oldest first: what the non-finite-loss advice
    chooses a checkpoint from without reading the files back.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()
        self.saved: dict[str, dict[str, Any] | None] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote storage (s3://, gs://): fsspec's own transaction is the atomic write there
            super().save_checkpoint(checkpoint, path, storage_options)
        else:
            folder = Path(path).parent.resolve()
            if folder not in self._cleaned:
                remove_stale_temp_files(folder)
                self._cleaned.add(folder)
            save_atomic(checkpoint, path)
        self.saved.pop(str(path), None)  # re-inserted last: the order is the order of the latest writes
        self.saved[str(path)] = checkpoint_health(checkpoint)

    def remove_checkpoint(self, path: _PATH) -> None:
        super().remove_checkpoint(path)
        self.saved.pop(str(path), None)


# --- reading ---------------------------------------------------------------------------------------------
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
        raise CheckpointError(f"checkpoint {path} is corrupted or not a PyTorch checkpoint ({first_line(error)}); "
                              "use another checkpoint") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({first_line(error)}); copy it again or use another "
            "checkpoint, e.g. a step_*.ckpt"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is a PyTorch file but not a Lightning training checkpoint (no 'state_dict'); "
                              "give a .ckpt file written by diffusion-lab-train")
    return checkpoint


def checkpoint_health(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"step", "weight_norm", "loss"}`` recorded at the save (None for checkpoints written before it was)."""
    health = (checkpoint.get("diffusion_lab") or {}).get("health")
    return dict(health) if isinstance(health, Mapping) else None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__
