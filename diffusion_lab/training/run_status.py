"""``<run folder>/status.json``: whether a run is running, completed or failed, its wall time and its error.

Written at start, when training begins and at the end of every run (atomically), so a sweep report can list
failed runs with their error instead of silently dropping them; a run killed from outside stays "running" with no
end time. ``ckpt_path=last`` reads it too: the newest run is the one started last (``started_at``, to the
millisecond), among runs that began training (``training_started_at``), so a run that stopped at start-up (a config
error, a refused resume) is never taken for the run to continue.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffusion_lab.utils.io import write_json_atomic

FILENAME = "status.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RunStatus:
    def __init__(self, output_dir: str | Path, overrides: list[str] | None = None) -> None:
        self.path = Path(output_dir) / FILENAME
        self._start = 0.0  # set by start()
        self.record: dict[str, Any] = {"status": "running", "started_at": None,
                                       "training_started_at": None, "finished_at": None,
                                       "wall_seconds": None, "host": socket.gethostname(),
                                       "overrides": list(overrides or []), "error": None, "traceback": None}

    def start(self) -> None:
        self.record["started_at"] = _now()
        self._start = time.perf_counter()
        self._write()

    def training_started(self) -> None:
        self.record["training_started_at"] = _now()
        self._write()

    def finish(self, metrics: dict[str, float] | None = None) -> None:
        self._end("completed", final_metrics=metrics or {})

    def fail(self, error: BaseException) -> None:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self._end(status, error=f"{type(error).__name__}: {error}",
                  traceback="".join(traceback.format_exception(error)))

    def _end(self, status: str, **fields: Any) -> None:
        self.record.update(status=status, finished_at=_now(),
                           wall_seconds=round(time.perf_counter() - self._start, 3), **fields)
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.record)


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / FILENAME
    return json.loads(path.read_text()) if path.is_file() else None
