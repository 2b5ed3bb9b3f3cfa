"""The notebooks run top to bottom on a CPU against a small checkpoint (and report) made in this test session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import eval_command

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.fixture(scope="module")
def small_report(digits_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("notebook_eval")
    args = eval_command(digits_checkpoint, out, out / "data", "num_samples=64", "batch_size=64",
                        "grid.samplers=[{sampler: ddim, eta: 0.0},{sampler: ddim, eta: 1.0},"
                        "{sampler: ddpm, variance: fixed_large},{sampler: dpm_solver, clip_denoised: true, steps: [5]}]",
                        "grid.steps=[5,10]",
                        "metrics.kid=false")
    result = subprocess.run(args, capture_output=True, text=True, cwd=out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "report.json"


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == [
        "01_quickstart.ipynb", "02_ddim_interpolation_inversion.ipynb", "03_fid_vs_steps.ipynb"]


@pytest.mark.parametrize("name", ["01_quickstart.ipynb", "02_ddim_interpolation_inversion.ipynb",
                                  "03_fid_vs_steps.ipynb"])
def test_notebook_runs_top_to_bottom(name, digits_checkpoint, small_report, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_LAB_CKPT", str(digits_checkpoint))
    monkeypatch.setenv("DIFFUSION_LAB_REPORT", str(small_report))
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert not any(cell.get("outputs") for cell in book.cells if cell.cell_type == "code")  # committed without outputs
    NotebookClient(book, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    errors = [o for cell in book.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for cell in book.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "every notebook shows at least one figure"
    text = "".join(o.get("text", "") for cell in book.cells for o in cell.get("outputs", []))
    if name.startswith("01"):
        assert f"checkpoint: {digits_checkpoint}" in text
    if name.startswith("03"):
        assert "7 cells, 64 samples each" in text
