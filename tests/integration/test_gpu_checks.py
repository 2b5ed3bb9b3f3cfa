"""experiments/benchmarks/gpu_checks.sh cannot rot between the sessions that lend a GPU: its dry run runs every part
(each training setting with its MFU and host-sync check, the GroupNorm layouts, 2-process DDP) on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "benchmarks" / "gpu_checks.sh"


def run_script(tmp_path: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("DRY_RUN", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def test_the_dry_run_runs_every_part_on_the_cpu(tmp_path):
    """About 80 s of CPU time on one thread (9 Python processes, most of it importing Lightning); several minutes of
    wall time on a loaded 2-core machine."""
    job = run_script(tmp_path, "--dry-run", timeout=1800)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    parts = ["train_eager", "train_compile", "train_compile_channels_last", "train_reduce_overhead", "group_norm",
             "train_ddp2", "train_ddp2_compile"]
    for part in parts:
        assert f"=== {part}: exit 0 after" in job.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["world_size"], r["batch_size"]) for r in rows] == [
        ("bf16-mixed", 1, 4), ("bf16-mixed + compile default", 1, 4),
        ("bf16-mixed + compile default + channels_last", 1, 4), ("bf16-mixed + compile reduce-overhead", 1, 4),
        ("bf16-mixed", 2, 4), ("bf16-mixed + compile default", 2, 4)]
    for r in rows:  # every setting: images/s, FLOPs and MFU computed; 2 steady-state steps without a host sync
        assert r["lightning"] > 0 and r["flops_per_image"] > 0 and r["peak_tflops"] == 1.0
        assert r["mfu"] == r["tflops_per_device"] == r["lightning"] / r["world_size"] * r["flops_per_image"] / 1e12
        assert r["steps_checked"] == 2 and r["host_syncs"] == [], r
    assert "GFLOP per training image (forward + backward, FlopCounterMode)" in job.stdout
    assert "NCHW torch" in (tmp_path / "out" / "group_norm.txt").read_text()
    assert "6 rows;" in job.stdout


def test_without_a_gpu_the_real_run_says_so_and_unknown_arguments_are_refused(tmp_path):
    job = run_script(tmp_path, "--dryrun", timeout=60)
    assert job.returncode == 2 and "unknown argument: --dryrun" in job.stdout
    job = run_script(tmp_path, timeout=300)
    assert job.returncode == 1 and "no CUDA GPU here" in job.stdout
