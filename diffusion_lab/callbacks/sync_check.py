"""Host syncs in steady-state training steps, refused or recorded: a debugging aid and the tests' check.

On a GPU every read of a tensor's value on the host (``loss.item()``, ``if flag:``, ``float(x)``, ``x.tolist()``,
``x.cpu()``, an op whose output size depends on the data: ``nonzero``, boolean-mask indexing, ``unique``,
``bincount`` ...) waits for every queued kernel: a host sync, which stops the CPU from running ahead of the device
and breaks CUDA-graph capture. :class:`SyncCheck` watches a window of training steps for them:

- on a GPU with ``torch.cuda.set_sync_debug_mode`` (the CUDA runtime's own view: every synchronising call), plus
  the Python-level reads below;
- on a CPU, where nothing waits, by intercepting the reads (:class:`HostReadGuard`): the ``torch.Tensor`` methods
  ``item``, ``tolist``, ``numpy``, ``cpu``, ``__bool__``, ``__float__``, ``__int__``, ``__index__`` are replaced,
  and a ``TorchDispatchMode`` refuses ``aten._local_scalar_dense`` (what every scalar read becomes, also from C++
  callers) and the data-dependent-shape ops.

Limits of the CPU check: a read made inside a C++ kernel below the Python dispatch key is not seen, nor is
``.to("cpu")`` (on a CPU it cannot be told from a no-op move). Inside a dispatch mode torch.compile runs the
original (eager) code, so on a CPU the check sees the eager step; on a GPU the compiled one runs (no dispatch mode).
"""

from __future__ import annotations

import traceback
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

PYTHON_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

# Ops that read a value on the host (a scalar) or size their output by the data (so the host must know it first).
SYNC_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
    aten.nonzero.default, aten.masked_select.default, aten.bincount.default, aten.repeat_interleave.Tensor,
    aten._unique.default, aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
}
_MASKED = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


def _caller() -> str:
    """The innermost frame outside torch and this file: the line that asked for the read."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("sync_check.py"):
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


class _RefuseSyncOps(TorchDispatchMode):
    def __init__(self, guard: "HostReadGuard") -> None:
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.guard.read(f"aten.{func.__name__}")
        elif func in _MASKED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.guard.read(f"aten.{func.__name__} with a boolean mask")
        return func(*args, **kwargs)


class HostReadGuard:
    """``with HostReadGuard(): ...`` raises AssertionError at the first host read of a tensor's value inside.

    ``raise_on_read=False`` records them instead (``guard.reads``: what and where), to list every read at once.
    ``aten=False`` leaves out the dispatch-mode level (the Python methods only); ``device_only=True`` refuses reads
    of device tensors only (on a GPU, reading a CPU tensor is no sync). ``enter()``/``exit()`` do what the ``with``
    block does, for hooks that start and end it in different calls."""

    def __init__(self, raise_on_read: bool = True, aten: bool = True, device_only: bool = False) -> None:
        self.raise_on_read, self.aten, self.device_only = raise_on_read, aten, device_only
        self.reads: list[str] = []
        self._saved: dict[str, Any] | None = None
        self._mode: _RefuseSyncOps | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def read(self, what: str) -> None:
        where = _caller()
        self.reads.append(f"{what} at {where}")
        if self.raise_on_read:
            raise AssertionError(f"read a tensor on the host ({what}) at {where}: a device sync on a GPU")

    def enter(self) -> "HostReadGuard":
        if self.active:
            raise RuntimeError("HostReadGuard is already active")
        self._saved = {name: getattr(torch.Tensor, name) for name in PYTHON_READS}
        for name in PYTHON_READS:
            setattr(torch.Tensor, name, self._refusing(name, self._saved[name]))
        if self.aten:
            self._mode = _RefuseSyncOps(self)
            self._mode.__enter__()
        return self

    def exit(self) -> None:
        if not self.active:
            return
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        self._saved = self._mode = None

    def _refusing(self, name: str, original: Any) -> Any:
        def refused(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.device_only or tensor.device.type != "cpu":
                self.read(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return refused

    def __enter__(self) -> "HostReadGuard":
        return self.enter()

    def __exit__(self, *exc: Any) -> None:
        self.exit()


class SyncCheck(L.Callback):
    """Watches training steps ``first`` .. ``last`` (0-based ``global_step``) for host syncs.

    Active from the start of step ``first`` to the start of step ``last + 1`` (or the end of training), so every
    hook of those steps (the module, clipping, the optimizer, the EMA, the loggers, the progress bar, checkpoint
    callbacks) and the fetch of the next batches are inside. Choose a window of steady-state steps: after warm-up
    (compilation, the EMA's first update) and without logging steps, evaluations or checkpoints, which read on the
    host by design. ``raise_on_read``: stop training at the first sync (with its location); otherwise record them
    in ``reads``. ``steps_checked``: how many steps ran inside the window.
    """

    def __init__(self, first: int, last: int, raise_on_read: bool = True) -> None:
        if not 0 <= first <= last:
            raise ValueError(f"SyncCheck needs 0 <= first <= last, got first={first}, last={last}")
        self.first, self.last, self.raise_on_read = first, last, raise_on_read
        self.reads: list[str] = []
        self.steps_checked = 0
        self._guard: HostReadGuard | None = None
        self._cuda = False
        self._warnings: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if self.first <= step <= self.last:
            self.steps_checked += 1
            if self._guard is None:
                self._start(pl_module.device)
        elif step > self.last:
            self._stop()

    def on_train_end(self, *_: Any) -> None:
        self._stop()

    def on_exception(self, *_: Any) -> None:
        self._stop()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop()

    def _start(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        # Inside a dispatch mode torch.compile runs eager code: on a GPU the CUDA runtime's check replaces it, and
        # only device tensors count (reading a CPU tensor waits for nothing).
        self._guard = HostReadGuard(self.raise_on_read, aten=not self._cuda, device_only=self._cuda).enter()
        if self._cuda:
            torch.cuda.synchronize()  # what was queued before the window is not the window's
            if not self.raise_on_read:
                self._warnings = warnings.catch_warnings(record=True)
                self._caught = self._warnings.__enter__()
                warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("error" if self.raise_on_read else "warn")

    def _stop(self) -> None:
        if self._guard is None:
            return
        if self._cuda:
            torch.cuda.set_sync_debug_mode("default")
            if self._warnings is not None:
                self._warnings.__exit__(None, None, None)
                self.reads += [f"CUDA sync ({w.message}) at {w.filename}:{w.lineno}" for w in self._caught
                               if "synchronizing" in str(w.message)]
                self._warnings, self._caught = None, []
        self._guard.exit()
        self.reads += self._guard.reads
        self._guard = None
