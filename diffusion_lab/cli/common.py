"""What the sampling and evaluation commands share: the output folder check and input errors."""

from __future__ import annotations

import os
from pathlib import Path

from diffusion_lab.errors import UserError


class OutputNotWritableError(UserError, PermissionError):
    """``out=`` names a folder this process cannot create or write to."""


class CountError(UserError, ValueError):
    """A count that must be positive (``num_images``, ``num_samples``) is not."""


def require_positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value <= 0:
        raise CountError(f"{name}={value!r}: needs a positive whole number of images, e.g. {name}=64")
    return value


def writable_dir(path: str | Path, key: str = "out") -> Path:
    """Create ``path`` (and parents) and check a file can be written in it; else a clear error, before any work."""
    path = Path(path)
    probe = path / f".write_probe.{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputNotWritableError(
            f"{key}={str(path)!r} is not writable ({error.strerror or error}); choose a folder you can write to, "
            f"e.g. {key}=./{path.name or 'out'}") from None
    return path
