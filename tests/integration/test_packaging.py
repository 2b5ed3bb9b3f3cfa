"""A non-editable install must find its configs: the wheel carries every YAML file of diffusion_lab/conf."""

import subprocess
import sys
import zipfile
from pathlib import Path

import diffusion_lab

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_configs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("diffusion_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = Path(diffusion_lab.__file__).parent / "conf"
    expected = {f"diffusion_lab/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
    assert len(expected) > 30 and expected <= names
    assert any(n.endswith("entry_points.txt") for n in names)
