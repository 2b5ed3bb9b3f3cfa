"""``diffusion-lab-eval``: evaluate a checkpoint over a grid of samplers x steps and write a FID report.

Runs on one process or on N (one per device, one node or many) through Lightning Fabric, launched the way
training is: ``fabric.devices=2`` spawns the processes itself; under ``torchrun`` or ``srun`` Fabric reads the
ranks from the environment. Each rank draws its share of the image indices, the features are gathered in
index order and rank 0 scores and writes the report: the numbers equal a 1-process run's.

Finished cells are saved after each one; a rerun with the same checkpoint (by sha256), sample count, seed,
precision and extractor skips them, so long evaluations resume, also on N processes (rank 0 decides what is
left and broadcasts it).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.progress import Progress

from diffusion_lab.cli.common import configure_threads, require_positive, writable_dir
from diffusion_lab.config import validate_config
from diffusion_lab.diffusion.denoiser import check_guidance_scale, net_contract
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import ConfigError
from diffusion_lab.cli.guard import main_guard
from diffusion_lab.loading import LoadedModel, load_model, sampling_net
from diffusion_lab.metrics.evaluate import evaluate, library_versions
from diffusion_lab.metrics.extractors import CLASSIFIES, make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig
from diffusion_lab.metrics.likelihood import append_markdown, check_nll_config, nll_cell
from diffusion_lab.metrics.reference import get_reference
from diffusion_lab.reports.fid_report import log_to_wandb, write_report
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.samplers.registry import build
from diffusion_lab.utils.io import write_json_atomic

log = logging.getLogger(__name__)

# What must match for a saved cell to be reused. Not the world size or the device: they do not change the
# numbers. Not the checkpoint's path: the same file typed another way is the same checkpoint.
RESUME_KEYS = ("checkpoint", "data", "extractor", "num_samples", "seed", "metrics_config", "precision")


# The grid's keys (conf/eval.yaml); any other key would be ignored, so it is refused instead.
GRID_KEYS = ("samplers", "steps", "guidance_scale")


def guidance_axis(cfg: DictConfig, net: Any = None) -> list[float]:
    """``grid.guidance_scale``: every cell is drawn at each of these classifier-free guidance scales (1: the
    conditional model alone). Given the ``net``, a scale other than 1 needs a class-conditional one."""
    value = cfg.grid.get("guidance_scale", [1.0])
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise ConfigError("grid.guidance_scale=[]: give at least one scale, e.g. grid.guidance_scale=[1.0] (the "
                          "conditional model alone) or [1,1.5,2,3,5]")
    try:
        scales = [check_guidance_scale(v) for v in values]
    except ConfigError as error:
        raise error.at("grid") from None
    if len(set(scales)) != len(scales):
        raise ConfigError(f"grid.guidance_scale={values}: a scale is listed twice")
    if net is not None and net_contract(net)["num_classes"] is None and scales != [1.0]:
        raise ConfigError(f"grid.guidance_scale={values} needs a class-conditional model; this checkpoint is "
                          "unconditional (model.net.num_classes=null): leave grid.guidance_scale=[1.0]")
    return scales


def cell_key(sampler_config: dict[str, Any], guidance_scale: float) -> str:
    """What identifies a finished cell in report.json (a cell without a scale was drawn at 1)."""
    return json.dumps({"sampler": sampler_config, "guidance_scale": float(guidance_scale)}, sort_keys=True)


def grid(cfg: DictConfig, diffusion: GaussianDiffusion | None = None) -> list[Sampler]:
    """The grid's cells: each row of ``grid.samplers`` (a registered sampler, samplers/registry.py) at each of its
    ``steps`` (the row's own, else ``grid.steps``; null: all T timesteps), built and, given the model's
    ``diffusion``, checked against it. A bad row or value is a :class:`ConfigError` naming the row."""
    g = cfg.grid
    unknown = [str(k) for k in g if str(k) not in GRID_KEYS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], GRID_KEYS, n=1)
        raise ConfigError(f"unknown grid key grid.{unknown[0]}{f' (did you mean grid.{close[0]}?)' if close else ''}; "
                          f"the keys are: {', '.join(GRID_KEYS)} (samplers are rows of grid.samplers)")
    rows = g.get("samplers") or []
    if not isinstance(rows, (list, ListConfig)):
        raise ConfigError(f"grid.samplers={rows!r} must be a list of rows, e.g. grid.samplers=[ddim,dpm_solver] or "
                          "'grid.samplers=[{sampler: ddim, eta: 1.0, steps: [10, 50]}]'")
    T = diffusion.num_timesteps if diffusion is not None else None
    samplers: list[Sampler] = []
    for i, row in enumerate(rows):
        row = OmegaConf.to_container(row, resolve=True) if isinstance(row, DictConfig) else row
        where = f"grid.samplers[{i}]" + (f" ({row})" if isinstance(row, str) else
                                          f" ({row.get('sampler') or row.get('_target_')})" if isinstance(row, dict) else "")
        try:
            if not isinstance(row, (str, dict)):
                raise ConfigError(f"a row is a sampler name or a mapping, not {row!r}")
            fields = {"sampler": row} if isinstance(row, str) else dict(row)
            if cfg.get("spacing") is not None and "spacing" not in fields:
                fields["spacing"] = cfg.spacing  # the grid-wide spacing, unless the row sets its own
            steps = fields.get("steps", g.get("steps"))
            for s in list(steps) if isinstance(steps, (list, tuple, ListConfig)) else [steps]:
                sampler = build(fields, num_steps=s)
                if diffusion is not None:
                    sampler.check(diffusion)
                samplers.append(dataclasses.replace(sampler, num_steps=T) if T is not None and s is None else sampler)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
    if not samplers and not cfg.nll.enabled:
        raise ConfigError("the evaluation grid is empty (grid.samplers=[] or every row has steps: []), so there is "
                          "nothing to evaluate; give a row, e.g. grid.samplers=[ddim] grid.steps=[50], or "
                          "nll.enabled=true for the bound alone")
    return samplers


def check_data_matches_model(cfg: DictConfig, net: Any, source: str) -> None:
    """The reference set (and the nll cell's images) are built at data.channels x data.image_size; a model drawing
    images of another shape would be scored against a set it never saw, so it is refused before any work."""
    config = getattr(net, "config", None)
    want = (getattr(config, "in_channels", None), getattr(config, "image_size", None))
    have = (cfg.data.get("channels"), cfg.data.get("image_size"))
    if None in want or None in have or tuple(map(int, have)) == tuple(map(int, want)):
        return
    raise ConfigError(
        f"{source} draws {want[0]}x{want[1]}x{want[1]} images but data={cfg.data.name} gives {have[0]}x{have[1]}x"
        f"{have[1]} (data.channels, data.image_size), so the reference statistics would be of other images; set "
        f"data.image_size={want[1]} data.channels={want[0]} (or choose the data set the model was trained on)")


def resolve_extractor(cfg: DictConfig) -> str:
    if cfg.feature_extractor != "auto":
        return cfg.feature_extractor
    return "digits-classifier" if cfg.data.name == "digits" else "inception-v3-compat"


def make_fabric(cfg: DictConfig):
    """Lightning Fabric from the ``fabric`` group, launched (processes spawned, or joined under torchrun/SLURM)."""
    from lightning.fabric import Fabric

    fabric = Fabric(**OmegaConf.to_container(cfg.fabric))
    fabric.launch()
    return fabric


def device_record(fabric: Any, cfg_num_nodes: int, precision: str, compile: bool) -> dict[str, Any]:
    """Where and how the images were drawn: recorded in the report, not part of the resume key."""
    device = fabric.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"world_size": fabric.world_size, "num_nodes": int(cfg_num_nodes), "accelerator": device.type,
            "device_name": name, "precision": precision, "compile": compile}


def _resume_value(report: dict[str, Any], key: str) -> Any:
    """The part of ``report[key]`` that decides resuming: for the checkpoint its bytes (sha256) and EMA choice."""
    value = report.get(key)
    if key == "checkpoint" and isinstance(value, dict):
        return {k: value.get(k) for k in ("sha256", "use_ema")}
    return value


def load_previous(out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The report to continue: the saved one's cells when it was made with the same RESUME_KEYS, else empty."""
    report = {**meta, "cells": [], "wall_seconds": 0.0}
    previous = out / "report.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if all(_resume_value(old, k) == _resume_value(meta, k) for k in RESUME_KEYS):
            report["cells"], report["wall_seconds"] = old["cells"], old.get("wall_seconds", 0.0)
            log.info("resuming: %d finished cells in %s", len(old["cells"]), previous)
        else:
            changed = [k for k in RESUME_KEYS if _resume_value(old, k) != _resume_value(meta, k)]
            log.warning("%s was made with other %s: starting the grid afresh", previous, ", ".join(changed))
    return report


class ETA:
    """Logs the grid's total network evaluations up front and, after the first batch, the time to finish.
    A guided cell (w != 1) counts twice: both branches run in one batched forward."""

    def __init__(self, todo: list[tuple[Sampler, float]], model: LoadedModel, num_samples: int, world_size: int,
                 verbose: bool = True) -> None:
        self.nfe = {i: len(s.visited(model.diffusion)) * (1 if w == 1 else 2) for i, (s, w) in enumerate(todo)}
        self.total = sum(self.nfe.values()) * num_samples
        self.local_total = self.total / world_size  # each rank draws about 1/W of the images
        self.done, self.start, self.reported = 0.0, time.perf_counter(), not verbose
        if verbose:
            log.info("grid: %d cells x %d samples, %s network evaluations in all (%d NFE per image summed over cells)",
                     len(todo), num_samples, f"{self.total:,}", sum(self.nfe.values()))

    def advance(self, cell: int, images: int) -> None:
        self.done += images * self.nfe[cell]
        if not self.reported and self.done > 0:
            self.reported = True
            elapsed = time.perf_counter() - self.start
            rate = self.done / elapsed
            log.info("first batch: %.0f network evaluations (images x NFE) per second per process; "
                     "estimated %.0f s to finish the grid", rate, (self.local_total - self.done) / rate)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    evaluating = cfg.ckpt is not None and not cfg.build_reference
    fabric = make_fabric(cfg)
    rank0 = fabric.is_global_zero
    if fabric.world_size == 1:  # N processes on one CPU: Fabric/torch divide the cores among them
        threads = configure_threads()
        if rank0:
            log.info(threads)

    # 1. every input, then the model: a bad value or ckpt fails in a second, before any reference statistics are
    # built (on every rank, so that no rank waits for one that failed)
    validate_config(cfg)
    model = None
    metrics = MetricsConfig(**cfg.metrics)
    if evaluating:
        require_positive("num_samples", cfg.num_samples)
        require_positive("batch_size", cfg.batch_size)
        metrics.check(cfg.num_samples)
        grid(cfg)  # the values alone, before the checkpoint is read
        guidance_axis(cfg)
        model = load_model(cfg.ckpt, cfg.use_ema, fabric.device)
        cells = grid(cfg, model.diffusion)  # and against the model (num_steps <= T)
        scales = guidance_axis(cfg, model.net)
        check_data_matches_model(cfg, model.net, f"ckpt={cfg.ckpt}")
        if cfg.nll.enabled:
            check_nll_config(cfg.nll, model.diffusion, cfg.data)
        net = sampling_net(model.net, cfg.precision, cfg.compile)
        out = Path(cfg.out) if cfg.out else (model.path.resolve().parent.parent / "eval")
        if rank0:
            writable_dir(out)

    # 2. the feature extractor and the reference statistics (rank 0 builds and caches them, then the others)
    extractor_name = resolve_extractor(cfg)
    reference = None
    with fabric.rank_zero_first():
        extractor = make_extractor(extractor_name, cfg.inception_weights)
        if rank0:
            reference = get_reference(instantiate(cfg.data), cfg.data.name, "train", extractor_name,
                                      Path(cfg.paths.data_dir) / "reference_stats",
                                      need_features=metrics.needs_reference_features, rebuild=cfg.build_reference,
                                      inception_weights=cfg.inception_weights, device=str(fabric.device))
            log.info("reference statistics: %s (%d images)", reference["path"], reference["num_images"])
            if evaluating:  # before any sampling: KID subsets larger than either set are refused
                real = reference.get("features")
                metrics.check(cfg.num_samples, None if real is None else len(real))
    if not evaluating:
        return None

    # 3. what is left to do: rank 0 reads a previous report and every rank gets the same list
    meta = {"checkpoint": {"path": str(cfg.ckpt), "sha256": model.sha256, "use_ema": cfg.use_ema},
            "data": cfg.data.name, "extractor": extractor_name, "num_samples": cfg.num_samples, "seed": cfg.seed,
            "metrics_config": OmegaConf.to_container(cfg.metrics), "precision": str(cfg.precision),
            "reference": None if reference is None else
            {"key": reference["key"], "num_images": reference["num_images"], "path": reference["path"]},
            "versions": library_versions(),
            "devices": device_record(fabric, cfg.fabric.num_nodes, str(cfg.precision), cfg.compile)}
    report = fabric.broadcast(load_previous(out, meta) if rank0 else None, src=0)
    done = {cell_key(c["sampler"], c.get("guidance_scale", 1.0)) for c in report["cells"]}
    todo = [(s, w) for s in cells for w in scales if cell_key(s.config(), w) not in done]
    # class accuracy where the extractor's logits classify this data set's classes (the digits classifier)
    accuracy = CLASSIFIES.get(extractor_name) == cfg.data.name

    # 4. the grid, one cell at a time; rank 0 saves after each, so a crash loses at most the cell in flight
    eta = ETA(todo, model, cfg.num_samples, fabric.world_size, verbose=rank0)
    with Progress(disable=not rank0) as progress:
        overall = progress.add_task("evaluation grid", total=len(todo))
        for i, (sampler, scale) in enumerate(todo):
            guided = f" guidance {scale:g}" if len(scales) > 1 or scale != 1 else ""
            task = progress.add_task(f"{sampler.name} {sampler.config()}{guided}",
                                     total=-(-cfg.num_samples // fabric.world_size))

            def advance(n: int, task=task, i=i) -> None:
                progress.advance(task, n)
                eta.advance(i, n)

            start = time.perf_counter()
            cell = evaluate(net, model.diffusion, sampler, cfg.num_samples, reference, extractor, metrics, cfg.seed,
                            cfg.batch_size, fabric.device, progress=advance, rank=fabric.global_rank,
                            world_size=fabric.world_size, all_gather=fabric.all_gather, guidance_scale=scale,
                            accuracy=accuracy)
            if rank0:
                report["cells"].append(cell)
                report["wall_seconds"] += time.perf_counter() - start
                write_json_atomic(out / "report.json", report)
                log.info("%s%s: %s", sampler.config(), guided, {k: round(v, 4) for k, v in cell["metrics"].items()})
            progress.remove_task(task)
            progress.advance(overall)
    # 5. the report (rank 0; the others wait so that no process exits while rank 0 still needs the group)
    if rank0:
        if cfg.nll.enabled:  # the bound in bits/dim: its own module, a cell of report.json (rank 0 computes it)
            report["nll"] = nll_cell(model.net, model.diffusion, instantiate(cfg.data), cfg.nll, out, fabric.device)
        paths = write_report(report, out)
        if cfg.nll.enabled:
            append_markdown(report["nll"], paths["markdown"])
        log.info("report: %s", ", ".join(str(p) for p in paths.values()))
        if cfg.wandb.enabled:
            task_name = (model.config or {}).get("task_name") or model.path.stem
            run_dir = log_to_wandb(report, paths, cfg.wandb.project, group=task_name, name=f"{task_name}/eval",
                                   offline=cfg.wandb.offline)
            log.info("W&B run: %s", run_dir)
    fabric.barrier()
    return report if rank0 else None


@main_guard
@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
