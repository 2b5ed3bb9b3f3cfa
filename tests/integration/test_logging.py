"""What reaches W&B (offline) and TensorBoard from a training run and from an evaluation report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from diffusion_lab.cli.train import train
from diffusion_lab.reports.sweep import read_metrics
from tests.conftest import eval_command

SHORT = ["trainer.max_steps=4", "trainer.log_every_n_steps=1", "callbacks.fid.every_n_steps=2",
         "callbacks.sample_grid.every_n_steps=2", "callbacks.model_checkpoint.every_n_train_steps=0"]


def wandb_records(run_dir: Path) -> list:
    """Every record of an offline W&B run, read back from its transaction log (``run-<id>.wandb``).

    wandb >= 0.19 ships no Python reader for it, so this is one: the file is a LevelDB-style log (a 7-byte
    header ":W&B", 0xBEE1, version 0; then 32 KiB blocks of chunks, each with a 7-byte header crc32 / length /
    type FULL=1 FIRST=2 MIDDLE=3 LAST=4) whose reassembled payloads are ``wandb_internal_pb2.Record`` messages.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (log_file,) = run_dir.glob("run-*.wandb")
    data = log_file.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    records, payload, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def history(records: list) -> list[dict]:
    """The logged rows; a media value (nested keys such as ["samples/grid", "_type"]) becomes a dict."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            target = row
            for key in keys[:-1]:
                target = target.setdefault(key, {})
            target[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    return rows


def test_offline_wandb_run_has_config_metrics_and_sample_grids(compose_cfg):
    cfg = compose_cfg(["logger=[csv,wandb,tensorboard]", *SHORT])
    train(cfg)
    out = Path(cfg.paths.output_dir)
    (run_dir,) = (out / "wandb").glob("offline-run-*")

    records = wandb_records(run_dir)
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in r.config.update})
    assert config["diffusion"]["schedule"] == "linear" and config["model"]["net"]["ch"] == 32  # the resolved config
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.run_group == "digits" and run_record.display_name == "digits/run"

    rows = history(records)
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    csv_losses = [v for _, v in read_metrics(out)["train/loss"]]
    assert len(losses) == 4 and losses == csv_losses  # the same numbers as the CSV logger's
    fids = [row["val/fid"] for row in rows if "val/fid" in row]
    assert fids == [v for _, v in read_metrics(out)["val/fid"]] and len(fids) == 2
    grids = [row["samples/grid"] for row in rows if "samples/grid" in row]
    assert len(grids) == 2 and grids[0]["_type"] == "images/separated"  # steps 2 and 4 (the end is step 4 too)
    assert len(list((run_dir / "files" / "media" / "images").rglob("*.png"))) == 2

    # TensorBoard: the same scalars and the grid images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("val/fid")] == [2, 4]
    assert len(events.Images("samples/grid")) == 2
    hparams = yaml.safe_load((out / "csv" / "hparams.yaml").read_text())
    assert hparams["diffusion"]["schedule"] == "linear"


def test_eval_report_goes_to_wandb(digits_checkpoint, tmp_path):
    out = tmp_path / "eval"
    args = eval_command(digits_checkpoint, out, tmp_path / "data", "num_samples=32", "batch_size=32",
                        "grid.samplers=[{sampler: ddim, eta: 0.0},{sampler: dpm_solver, clip_denoised: true}]",
                        "grid.steps=[5]", "metrics.kid=false", "wandb.enabled=true")
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.job_type == "eval" and run_record.run_group == "digits"
    (row,) = [row for row in history(records) if "eval/cells" in row]
    assert row["eval/cells"]["_type"] == "table-file" and row["eval/fid_vs_nfe"]["_type"] == "image-file"
    (table_file,) = (run_dir / "files" / "media" / "table" / "eval").glob("cells_*.table.json")
    table = json.loads(table_file.read_text())
    fid_column = table["columns"].index("fid")
    assert [r[fid_column] for r in table["data"]] == [c["metrics"]["fid"] for c in report["cells"]]
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update}
    assert summary["eval/best_fid/DDIM eta=0"] == report["cells"][0]["metrics"]["fid"]
    (artifact,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "evaluation"]
    assert {m.path for m in artifact.manifest.contents} == {"report.json", "report.md"}
