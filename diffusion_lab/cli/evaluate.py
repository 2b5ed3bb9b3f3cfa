"""``diffusion-lab-eval``: evaluate a checkpoint over a grid of samplers x steps and write a FID report.

Finished cells are saved after each one; a rerun with the same checkpoint, sample count, seed and extractor
skips them, so long evaluations resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from diffusion_lab.metrics.evaluate import evaluate, library_versions
from diffusion_lab.metrics.extractors import make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig
from diffusion_lab.metrics.likelihood import append_markdown, nll_cell
from diffusion_lab.metrics.reference import get_reference
from diffusion_lab.reports.fid_report import log_to_wandb, write_report
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.training.checkpoints import load_checkpoint
from diffusion_lab.utils.io import write_json_atomic

log = logging.getLogger(__name__)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def grid(cfg: DictConfig, T: int) -> list[Sampler]:
    g, spacing = cfg.grid, cfg.spacing
    cells: list[Sampler] = []
    full = [T] if g.get("full_steps") else []
    for eta in g.get("ddim_eta") or []:
        steps = list(g.ddim_steps) + (full if eta == 0.0 else [])
        cells += [DDIMSampler(num_steps=s, eta=float(eta), spacing=spacing,
                              clip_denoised=bool(g.get("ddim_clip_denoised", False))) for s in steps]
    for variance in g.get("ddpm_variance") or []:
        cells += [DDPMSampler(num_steps=s, variance=variance, spacing=spacing) for s in list(g.ddpm_steps) + full]
    cells += [DPMSolverSampler(num_steps=s) for s in g.get("dpm_solver_steps") or []]
    return cells


def checkpoint_config(ckpt: Path) -> dict[str, Any] | None:
    """The resolved training config stored in a training checkpoint (None for a pipeline folder)."""
    if not ckpt.is_file():
        return None
    return (load_checkpoint(ckpt).get("diffusion_lab") or {}).get("config")


def resolve_extractor(cfg: DictConfig) -> str:
    if cfg.feature_extractor != "auto":
        return cfg.feature_extractor
    return "digits-classifier" if cfg.data.name == "digits" else "inception-v3-compat"


def run(cfg: DictConfig) -> dict[str, Any] | None:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    evaluating = cfg.ckpt is not None and not cfg.build_reference
    if evaluating:  # first: a bad ckpt fails in a second, before any reference statistics are built
        from diffusion_lab.cli.sample import load_model

        ckpt = Path(cfg.ckpt)
        net, diffusion = load_model(ckpt, cfg.use_ema, device)
    extractor_name = resolve_extractor(cfg)
    metrics = MetricsConfig(**cfg.metrics)
    # Fail before any sampling: weights of the feature extractor, then the reference statistics.
    extractor = make_extractor(extractor_name, cfg.inception_weights)
    datamodule = instantiate(cfg.data)
    reference_dir = Path(cfg.paths.data_dir) / "reference_stats"
    reference = get_reference(datamodule, cfg.data.name, "train", extractor_name, reference_dir,
                              need_features=metrics.kid, rebuild=cfg.build_reference,
                              inception_weights=cfg.inception_weights, device=device)
    log.info("reference statistics: %s (%d images)", reference["path"], reference["num_images"])
    if not evaluating:
        return None

    out = Path(cfg.out) if cfg.out else (ckpt.resolve().parent.parent / "eval")
    meta = {"checkpoint": {"path": str(cfg.ckpt), "sha256": sha256(ckpt), "use_ema": cfg.use_ema},
            "data": cfg.data.name, "extractor": extractor_name, "num_samples": cfg.num_samples, "seed": cfg.seed,
            "metrics_config": OmegaConf.to_container(cfg.metrics),
            "reference": {"key": reference["key"], "num_images": reference["num_images"], "path": reference["path"]},
            "versions": library_versions(), "device": str(device)}
    report = {**meta, "cells": [], "wall_seconds": 0.0}
    previous = out / "report.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        same = all(old.get(k) == meta[k] for k in ("checkpoint", "data", "extractor", "num_samples", "seed",
                                                    "metrics_config"))
        if same:
            report["cells"], report["wall_seconds"] = old["cells"], old.get("wall_seconds", 0.0)
            log.info("resuming: %d finished cells in %s", len(old["cells"]), previous)
    done = {json.dumps(c["sampler"], sort_keys=True) for c in report["cells"]}
    todo = [s for s in grid(cfg, diffusion.num_timesteps) if json.dumps(s.config(), sort_keys=True) not in done]
    out.mkdir(parents=True, exist_ok=True)
    with Progress() as progress:
        overall = progress.add_task("evaluation grid", total=len(todo))
        for sampler in todo:
            task = progress.add_task(f"{sampler.name} {sampler.config()}", total=cfg.num_samples)
            start = time.perf_counter()
            cell = evaluate(net, diffusion, sampler, cfg.num_samples, reference, extractor, metrics, cfg.seed,
                            cfg.batch_size, device, progress=lambda n, t=task: progress.advance(t, n))
            report["cells"].append(cell)
            report["wall_seconds"] += time.perf_counter() - start
            write_json_atomic(out / "report.json", report)  # a crash loses at most the cell in flight
            progress.remove_task(task)
            progress.advance(overall)
            log.info("%s: %s", sampler.config(), {k: round(v, 3) for k, v in cell["metrics"].items()})
    if cfg.nll.enabled:  # the bound in bits/dim (issue 12): its own module, a cell of report.json
        report["nll"] = nll_cell(net, diffusion, datamodule, cfg.nll, out, device)
    paths = write_report(report, out)
    if cfg.nll.enabled:
        append_markdown(report["nll"], paths["markdown"])
    log.info("report: %s", ", ".join(str(p) for p in paths.values()))
    if cfg.wandb.enabled:
        task = (checkpoint_config(ckpt) or {}).get("task_name") or ckpt.stem
        run_dir = log_to_wandb(report, paths, cfg.wandb.project, group=task, name=f"{task}/eval",
                               offline=cfg.wandb.offline)
        log.info("W&B run: %s", run_dir)
    return report


@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
