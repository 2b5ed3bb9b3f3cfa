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


def usable_cpus() -> tuple[int, str]:
    """How many CPUs this process may use, and why: its CPU affinity, lowered by a cgroup CPU quota (a container's
    ``--cpus``). ``os.cpu_count()`` (and the thread count torch may pick from it) counts the host's cores."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    why = f"CPU affinity {count}"
    quota = _cgroup_cpu_quota()
    if quota is not None and quota < count:
        count, why = max(1, int(quota + 0.999)), f"{why}, cgroup CPU quota {quota:g}"
    return count, why


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``); None when unlimited or unknown."""
    for quota_file, period_file in (("/sys/fs/cgroup/cpu.max", None),
                                    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")):
        try:
            text = Path(quota_file).read_text().split()
            quota, period = text[0], (text[1] if period_file is None else Path(period_file).read_text().strip())
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except ValueError:
            return None
    return None


def configure_threads() -> str:
    """Set torch's intra-op threads to the usable CPUs (unless OMP_NUM_THREADS says otherwise); returns the line
    the commands log at start-up. More threads than CPUs spin against each other: on a busy 2-core VM the default
    run fell from ~2.6 to 0.1 steps/s (README, Troubleshooting)."""
    import torch

    count, why = usable_cpus()
    if os.environ.get("OMP_NUM_THREADS"):
        return (f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; "
                f"{why})")
    torch.set_num_threads(count)
    return f"CPU threads: {count} ({why}; set OMP_NUM_THREADS=N to choose, e.g. 1 on a busy machine)"
