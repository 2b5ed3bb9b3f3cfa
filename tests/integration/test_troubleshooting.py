"""Every row of the README's Troubleshooting table, run through the real command: exit status 2, one
``error: <message>`` line that starts as the table says, and no Python traceback.

The table is the test's data (between the ``troubleshooting-table`` markers), so the README cannot promise a
message the commands do not print. An ``<angle-bracket>`` name in a row is a file or folder built here; ``...`` in a
message stands for any text. An input is split as a shell splits it (shlex), so a Hydra value with spaces, braces
or commas is quoted as one would type it: 'grid.samplers=[{sampler: ddim, eta: 1.0}]'. Rows run two at a time
(each is its own Python process: ~5 s of imports).
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"
MODULES = {"train": "diffusion_lab.cli.train", "sample": "diffusion_lab.cli.sample", "eval": "diffusion_lab.cli.evaluate"}
PLACEHOLDER = re.compile(r"<[^<>]+>")


def table_rows() -> list[tuple[str, str, str]]:
    """(command, arguments, message) of every row between the markers."""
    text = README.read_text()
    body = text.split("<!-- troubleshooting-table:start", 1)[1].split("<!-- troubleshooting-table:end -->", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in MODULES:
            continue
        args = re.match(r"`([^`]*)`", cells[1]).group(1)
        message = re.match(r"`(.*)`", cells[2]).group(1)
        rows.append((cells[0], args, message))
    return rows


ROWS = table_rows()


def test_the_table_covers_the_issue():
    assert len(ROWS) >= 40
    assert {command for command, _, _ in ROWS} == set(MODULES)
    assert len({(c, a) for c, a, _ in ROWS}) == len(ROWS), "a row is listed twice"


@pytest.fixture(scope="module")
def files(digits_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """What the rows' <placeholders> name."""
    from tests.integration.test_pipeline_inputs import BROKEN_FOLDERS, broken_copy

    from diffusion_lab.pipelines import DDPMPipeline

    root = tmp_path_factory.mktemp("troubleshooting")
    data = digits_checkpoint.read_bytes()
    text, noise, cut = root / "notes.ckpt", root / "noise.ckpt", root / "cut.ckpt"
    text.write_text("step,loss\n1,0.5\n")
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    cut.write_bytes(data[: len(data) * 2 // 3])
    payload = root / "payload.ckpt"  # torch.save's zip format with a pickled global inside
    with open(payload, "wb") as f:
        torch.save({"state_dict": {}, "x": _MakeDirs(str(root / "pwned"))}, f)
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    checkpoint["diffusion_lab"]["config"]["model"]["net"]["_target_"] = "os.makedirs"
    foreign = root / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    pipeline = root / "pipeline"
    DDPMPipeline.from_checkpoint(digits_checkpoint).save_pretrained(pipeline)
    broken = {"pipeline without scheduler_config.json": "no_scheduler_config", "pipeline without unet/": "no_unet",
              "pipeline with an unknown scheduler field": "unknown_scheduler_field",
              "pipeline with an unknown variance_type": "variance_type",
              "pipeline with sample_size 16 for 8x8 weights": "sample_size_not_trained",
              "pipeline with in_channels 3 for 1-channel weights": "in_channels"}
    paths = {"checkpoint": digits_checkpoint, "text file": text, "random bytes": noise, "truncated checkpoint": cut,
             "pickle checkpoint": payload, "foreign checkpoint": foreign, "missing file": root / "missing.ckpt",
             "empty folder": root / "empty_run"}
    paths["empty folder"].mkdir()
    for name, case in broken.items():
        folder = root / case
        folder.mkdir()
        paths[name] = broken_copy(pipeline, folder, **BROKEN_FOLDERS[case][0])
    return paths


class _MakeDirs:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _run(command: str, args: str, files: dict[str, Path], tmp: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(PLACEHOLDER.sub(lambda m: str(files[m.group(0)[1:-1]]), args))  # quoted as in a shell
    defaults = {"train": [f"paths.log_dir={tmp / 'runs'}", f"paths.data_dir={tmp / 'data'}"],
                "sample": [f"out={tmp / 'samples'}"],
                "eval": [f"out={tmp / 'eval'}", f"paths.data_dir={tmp / 'data'}"]}[command]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DIFFUSION_LAB_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", MODULES[command], *argv, *defaults], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def _pattern(message: str, files: dict[str, Path]) -> re.Pattern:
    """The row's message as a regex: placeholders become their paths, ``...`` any text."""
    parts = []
    for piece in re.split(r"(<[^<>]+>|\.\.\.)", message):
        if piece == "...":
            parts.append(".*")
        elif PLACEHOLDER.fullmatch(piece) and piece[1:-1] in files:
            parts.append(re.escape(str(files[piece[1:-1]])))
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.DOTALL)


def test_every_row_is_one_clean_line_from_the_real_command(files, tmp_path):
    def run(i_row):
        i, (command, args, message) = i_row
        tmp = tmp_path / f"row{i:02d}"
        tmp.mkdir()
        return command, args, message, _run(command, args, files, tmp)

    failures = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for command, args, message, result in pool.map(run, enumerate(ROWS)):
            output = result.stdout + result.stderr
            errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
            where = f"{command} {args}"
            if result.returncode != 2:
                failures.append(f"{where}: exit {result.returncode}\n{output[-1500:]}")
            elif "Traceback" in output or "Error executing job" in output:
                failures.append(f"{where}: a traceback or Hydra's job line\n{output[-1500:]}")
            elif len(errors) != 1 or not _pattern(message, files).match(errors[0][len("error: "):]):
                failures.append(f"{where}: expected 'error: {message}', got {errors or output[-800:]}")
    assert not failures, f"{len(failures)} of {len(ROWS)} rows:\n\n" + "\n\n".join(failures)
