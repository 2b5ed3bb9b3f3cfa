"""Crash-safe checkpoint files: Lightning's ``TorchCheckpointIO`` with a write that is atomic on every setup.

Lightning's own ``_atomic_save`` goes through an fsspec transaction whose temporary file lives in the system temp
folder; when ``TMPDIR`` is on another filesystem than the run folder the final move is a copy, and a kill during
it leaves a truncated ``last.ckpt`` in place of the good one. Here the temporary file lives in the destination
folder itself, is flushed and fsync'ed, and only then renamed over the target with ``os.replace`` (atomic on
POSIX and Windows within one filesystem): a reader sees the old file or the new one, never a piece.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffusion_lab.utils.io import TEMP_MARK, atomic_open

log = logging.getLogger(__name__)

# Test hook for fault injection (tests/integration/test_reliability.py): "<file name>:<global step>" makes the save
# of that file at that step write half of its bytes, fsync them, touch "<temp file>.stalled" and sleep, so the test
# can kill the process mid-save deterministically. Unset in normal use.
STALL_ENV = "DIFFUSION_LAB_TEST_STALL_SAVE"


def temp_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"*{TEMP_MARK}*") if p.is_file()) if folder.is_dir() else []


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the partial files a killed save left in ``folder``; returns what was removed."""
    removed = []
    for path in temp_files(folder):
        if path.name.endswith(".stalled"):
            path.unlink(missing_ok=True)
            continue
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
        if _should_stall(Path(path), payload):
            _write_half_and_stall(payload, f)
        torch.save(payload, f)


def _should_stall(path: Path, payload: Any) -> bool:
    spec = os.environ.get(STALL_ENV)
    if not spec or not isinstance(payload, dict):
        return False
    name, _, step = spec.rpartition(":")
    return path.name == name and str(payload.get("global_step")) == step


def _write_half_and_stall(payload: Any, f: Any) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    Path(f"{f.name}.stalled").touch()
    time.sleep(600)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic in the destination folder (see the module docstring).

    The first save into a folder also removes partial files an earlier killed save left there.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):  # remote storage (s3://, gs://): fsspec's own transaction is the atomic write there
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder = Path(path).parent.resolve()
        if folder not in self._cleaned:
            remove_stale_temp_files(folder)
            self._cleaned.add(folder)
        save_atomic(checkpoint, path)
