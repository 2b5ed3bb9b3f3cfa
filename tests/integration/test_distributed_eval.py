"""diffusion-lab-eval at scale: 2 gloo processes give the 1-process numbers, a killed 2-process grid resumes,
resume is keyed on the checkpoint's sha256, mixed-precision sampling, and the clear errors of bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import eval_command

# Three small cells; the last is the longest so that a kill after the first cell lands before the grid ends.
GRID = ["num_samples=40", "batch_size=8",
        "grid.samplers=[{sampler: ddim, eta: 0.0, steps: [4]},{sampler: ddpm, variance: fixed_small, steps: [6]},"
        "{sampler: dpm_solver, clip_denoised: true, steps: [30]}]",
        "metrics.kid_subset_size=20", "metrics.kid_subsets=10", "metrics.fid_bootstrap=5"]


def run_eval(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_processes_give_the_one_process_numbers_and_a_killed_grid_resumes(digits_checkpoint, tmp_path):
    data = tmp_path / "data"
    one = tmp_path / "one"
    run_eval(eval_command(digits_checkpoint, one, data, *GRID), tmp_path)  # also builds the reference first

    # 2 processes: start, kill the whole process group once the first cell is saved, rerun: it resumes
    two = tmp_path / "two"
    args = eval_command(digits_checkpoint, two, data, *GRID, "fabric.devices=2", "fabric.accelerator=cpu")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    cells = 0
    while time.monotonic() < deadline and proc.poll() is None:
        report = two / "report.json"
        if report.is_file() and (cells := len(json.loads(report.read_text())["cells"])) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the 2-process run ended before it could be killed: {proc.stderr.read()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 1 <= cells < 3
    resumed = run_eval(args, tmp_path)
    assert f"resuming: {cells} finished cells" in resumed.stderr + resumed.stdout

    a, b = (json.loads((folder / "report.json").read_text()) for folder in (one, two))
    assert b["devices"]["world_size"] == 2 and a["devices"]["world_size"] == 1
    assert b["devices"]["precision"] == "32" and b["devices"]["compile"] is False
    key = lambda cell: json.dumps(cell["sampler"], sort_keys=True)  # noqa: E731
    cells_a, cells_b = ({key(c): c for c in r["cells"]} for r in (a, b))
    assert set(cells_a) == set(cells_b) and len(cells_a) == 3
    for name, cell in cells_a.items():
        assert set(cell["metrics"]) == {"fid", "fid_std", "is", "is_std", "kid", "kid_std", "precision", "recall"}
        for metric, value in cell["metrics"].items():
            assert cells_b[name]["metrics"][metric] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, metric)
    assert "FID +- sd" in (two / "report.md").read_text()


def test_resume_is_keyed_on_the_checkpoint_bytes_not_its_path(digits_checkpoint, tmp_path):
    out, data = tmp_path / "eval", tmp_path / "data"
    grid = ["num_samples=20", "batch_size=10", "grid.samplers=[{sampler: ddim, eta: 0.0}]",
            "grid.steps=[3]", "metrics.kid=false", "metrics.fid_bootstrap=0"]
    run_eval(eval_command(digits_checkpoint.resolve(), out, data, *grid), tmp_path)
    # the same file through a relative path from another working directory
    relative = Path(os.path.relpath(digits_checkpoint.resolve(), tmp_path))
    again = run_eval(eval_command(relative, out, data, *grid), tmp_path)
    assert "resuming: 1 finished cells" in again.stderr + again.stdout
    # a different file (other bytes) at the same path does not reuse the cells
    copy = tmp_path / "copy.ckpt"
    payload = torch.load(digits_checkpoint, weights_only=False)
    payload["global_step"] = payload.get("global_step", 0) + 1
    torch.save(payload, copy)
    run_eval(eval_command(copy, out, data, *grid), tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["path"] == str(copy)
    first = run_eval(eval_command(copy, out, data, *grid), tmp_path)
    assert "resuming: 1 finished cells" in first.stderr + first.stdout


@pytest.mark.parametrize("args, message", [
    (["num_samples=0"], "num_samples=0: needs a positive"),
    (["num_samples=10", "metrics.kid_subset_size=50"], "kid_subset_size=50 needs at least that many samples"),
    (["out=/proc/not_here"], "out='/proc/not_here' is not writable"),
    (["ckpt=/nonexistent.ckpt"], "is neither a checkpoint file nor a pipeline folder"),
])
def test_eval_refuses_bad_input_without_a_traceback(digits_checkpoint, tmp_path, args, message):
    ckpt = Path(args.pop(0).split("=", 1)[1]) if args[0].startswith("ckpt=") else digits_checkpoint
    cmd = eval_command(ckpt, tmp_path / "eval", tmp_path / "data", *args)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["num_images=0"], "num_images=0: needs a positive"),
    (["out=/proc/not_here"], "is not writable"),
])
def test_sample_refuses_bad_input_without_a_traceback(digits_checkpoint, tmp_path, args, message):
    import sys

    cmd = [sys.executable, "-m", "diffusion_lab.cli.sample", f"ckpt={digits_checkpoint}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
