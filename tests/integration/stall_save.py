"""``python -m tests.integration.stall_save <file name>:<global step> <marker> <train overrides...>``

``diffusion-lab-train`` whose save of that file at that step writes half of its bytes into the temp file, fsyncs
them, touches ``<marker>`` and sleeps, so that a test can SIGKILL the process mid-save deterministically. The
hook patches the writer (``checkpoint_io.save_atomic``) here; production code has none.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from diffusion_lab.training import checkpoint_io


def stalling_save(name: str, step: int, marker: Path):
    original = checkpoint_io.save_atomic

    def save_atomic(payload: Any, path: str | Path) -> None:
        if Path(path).name != name or payload.get("global_step") != step:
            return original(payload, path)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        data = buffer.getvalue()
        with checkpoint_io.atomic_open(path, "wb") as f:  # the real temp file, in the checkpoint folder
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            marker.touch()
            time.sleep(600)

    return save_atomic


def main() -> None:
    spec, marker, *overrides = sys.argv[1:]
    name, _, step = spec.rpartition(":")
    checkpoint_io.save_atomic = stalling_save(name, int(step), Path(marker))
    sys.argv = ["diffusion-lab-train", *overrides]
    from diffusion_lab.cli.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
