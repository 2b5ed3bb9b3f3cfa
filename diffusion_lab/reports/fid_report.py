"""An evaluation grid (samplers x steps) as a FID report: JSON with everything, a Markdown table laid out like
DDIM's Table 1 (paper numbers beside ours where published), and a plot of FID against network evaluations.

A class-conditional model's grid also has a guidance axis: the Table-1 tables hold its guidance-1 cells (the
conditional model alone), a guidance section holds every scale (FID +- sd, IS, class accuracy, precision, recall
per sampler and S), and ``fid_vs_accuracy.png`` plots FID against class accuracy along the guidance scale."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusion_lab.reports.paper import PAPER_FID, published
from diffusion_lab.utils.io import save_figure_atomic, write_json_atomic


def cell_label(cell: dict[str, Any]) -> str:
    """A cell's row: the label its sampler gave it (``Sampler.label()``, saved in the cell), or for cells saved
    without one, the label of the registered sampler its config names (its bare name when that is gone)."""
    if cell.get("label"):
        return cell["label"]
    return label_of(cell["sampler"])


def label_of(config: dict[str, Any]) -> str:
    from diffusion_lab.samplers.registry import build

    fields = {k: v for k, v in config.items() if k != "name"}
    try:
        return build({"sampler": config["name"], **fields}).label()
    except Exception:  # a sampler no longer registered, or a field it no longer has: its name alone
        return str(config["name"])


def rows_in_order(cells: list[dict[str, Any]]) -> list[str]:
    """The rows in the order the grid listed them."""
    return list(dict.fromkeys(cell_label(c) for c in cells))


def _cell_text(cell: dict[str, Any] | None, metric: str) -> str:
    """One table entry: 3 decimals for rates, 2 for the rest, and FID's bootstrap sd; empty for a missing cell."""
    if cell is None or metric not in cell["metrics"]:
        return ""
    text = f"{cell['metrics'][metric]:.{3 if metric in ('precision', 'recall', 'class_accuracy') else 2}f}"
    if metric == "fid" and "fid_std" in cell["metrics"]:
        text += f" +- {cell['metrics']['fid_std']:.2f}"
    return text


def guidance(cell: dict[str, Any]) -> float:
    """A cell's guidance scale (unconditional cells and older reports: 1)."""
    return float(cell.get("guidance_scale", 1.0))


def guidance_section(cells: list[dict[str, Any]]) -> list[str]:
    """Tables of every metric against the guidance scale, one row per (sampler, S)."""
    scales = sorted({guidance(c) for c in cells})
    rows = list(dict.fromkeys((cell_label(c), c["sampler"]["num_steps"]) for c in cells))
    by = {(cell_label(c), c["sampler"]["num_steps"], guidance(c)): c for c in cells}
    labels = sorted({c["class_labels"] for c in cells if c.get("class_labels")})
    lines = ["## Classifier-free guidance", "",
             "Guidance scale w (diffusers' `guidance_scale`): 1 is the conditional model alone, > 1 guided; a guided "
             "cell runs both branches in one batched forward (the same NFE at twice the batch). Class labels: "
             + ("; ".join(labels) if labels else "none") + ".", ""]
    tables = (("fid", "FID +- sd"), ("is", "IS"), ("class_accuracy", "Class accuracy (samples the data set's "
              "classifier assigns to their class)"), ("precision", "Precision"), ("recall", "Recall"))
    for metric, title in tables:
        if not any(metric in c["metrics"] for c in cells):
            continue
        lines += [f"### {title}", "", "| sampler, S \\ w | " + " | ".join(f"{w:g}" for w in scales) + " |",
                  "|---|" + "---|" * len(scales)]
        for key, steps in rows:
            out = [_cell_text(by.get((key, steps, w)), metric) for w in scales]
            lines.append(f"| {key}, {steps} | " + " | ".join(out) + " |")
        lines.append("")
    return lines


def markdown(report: dict[str, Any]) -> str:
    conditional = [c for c in report["cells"] if "guidance_scale" in c]
    cells = [c for c in report["cells"] if guidance(c) == 1.0]
    steps = sorted({c["sampler"]["num_steps"] for c in cells})
    rows = rows_in_order(cells)
    data = report.get("data", "")
    by = {(cell_label(c), c["sampler"]["num_steps"]): c for c in cells}
    lines = [
        f"# FID report: {report['checkpoint']['path']}",
        "",
        f"{report['num_samples']:,} samples per cell (seed {report['seed']}) against {report['reference']['num_images']:,} "
        f"images of {report['data']} ({report['reference']['key']['split']} split), features: {report['extractor']}. "
        f"Checkpoint sha256 {report['checkpoint']['sha256'][:16]}. Wall time {report['wall_seconds']:.0f} s.",
        "",
    ]
    tables = (("fid", "FID +- sd (lower is better)"), ("is", "IS (higher is better)"),
              ("precision", "Precision (higher is better)"), ("recall", "Recall (higher is better)"))
    for metric, title in tables:
        if not any(metric in c["metrics"] for c in cells):
            continue
        lines += [f"## {title}" + (" - ours (paper)" if data in PAPER_FID and metric == "fid" else ""), "",
                  "| sampler \\ S | " + " | ".join(str(s) for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for key in rows:
            out = []
            for s in steps:
                cell = by.get((key, s))
                text = _cell_text(cell, metric)
                paper = published(data, cell["sampler"], s) if text and metric == "fid" else None
                out.append(f"{text} ({paper:.2f})" if paper is not None else text)
            lines.append(f"| {key} | " + " | ".join(out) + " |")
        lines.append("")
    if conditional:
        lines += guidance_section(conditional)
    bootstrap = (report.get("metrics_config") or {}).get("fid_bootstrap") or 0
    if bootstrap > 1:
        lines += [f"sd: standard deviation of FID over {bootstrap} bootstrap resamples of the generated features "
                  "(the sampling noise of this many images; not the reference's noise, not training noise). "
                  "Precision and recall: Kynkaanniemi et al. 2019, "
                  f"k = {(report.get('metrics_config') or {}).get('prc_neighborhood', 3)}.", ""]
    devices = report.get("devices")
    if devices:
        lines += [f"Drawn on {devices['world_size']} process(es), {devices['accelerator']} ({devices['device_name']}), "
                  f"precision {devices['precision']}, compile {devices['compile']}.", ""]
    lines += ["S is the requested number of steps; the network evaluations (NFE) of each cell are in report.json.",
              f"Samplers' spacing: {sorted({c['sampler']['spacing'] for c in report['cells']})}.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    series: dict[str, list[tuple[int, float, float]]] = {}
    for c in report["cells"]:
        if "fid" in c["metrics"] and guidance(c) == 1.0:
            series.setdefault(cell_label(c), []).append((c["nfe"], c["metrics"]["fid"], c["metrics"].get("fid_std", 0.0)))
    for key, points in series.items():
        points.sort()
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                    capsize=3, label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("FID (error bars: bootstrap sd)")
    ax.set_title(f"FID vs NFE - {report['data']}, {report['num_samples']:,} samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def plot_guidance(report: dict[str, Any], path: Path) -> None:
    """FID against class accuracy, one line per (sampler, S) through the guidance scales, each point labelled w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    series: dict[tuple, list[tuple[float, float, float, float]]] = {}
    for c in report["cells"]:
        m = c["metrics"]
        if "guidance_scale" in c and "fid" in m and "class_accuracy" in m:
            key = (cell_label(c), c["sampler"]["num_steps"])
            series.setdefault(key, []).append((guidance(c), m["class_accuracy"], m["fid"], m.get("fid_std", 0.0)))
    for (label, steps), points in series.items():
        points.sort()
        ax.errorbar([p[1] for p in points], [p[2] for p in points], yerr=[p[3] for p in points], marker="o",
                    capsize=3, label=f"{label}, {steps} steps")
        for w, acc, fid, _ in points:
            ax.annotate(f"w={w:g}", (acc, fid), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("class accuracy (classifier agrees with the requested class)")
    ax.set_ylabel("FID (error bars: bootstrap sd)")
    ax.set_title(f"FID vs class accuracy along the guidance scale - {report['data']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md and fid_vs_nfe.png in ``out_dir`` (and fid_vs_accuracy.png for a conditional model
    scored with a classifier of its classes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md", "plot": out_dir / "fid_vs_nfe.png"}
    write_json_atomic(paths["json"], report)
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    if any("class_accuracy" in c["metrics"] for c in report["cells"]):
        paths["guidance_plot"] = out_dir / "fid_vs_accuracy.png"
        plot_guidance(report, paths["guidance_plot"])
    return paths


def log_to_wandb(report: dict[str, Any], paths: dict[str, Path], project: str = "diffusion_lab",
                 group: str | None = None, name: str | None = None, offline: bool = True) -> str:
    """Log a FID report as its own W&B run (job_type "eval"): every cell as a table row, the FID-vs-NFE plot,
    the best FID per sampler row in the summary, and report.json/.md as an "evaluation" artifact.
    Offline unless ``offline=False`` (the run lands under ``<report folder>/wandb``). Returns the run's folder."""
    import wandb

    run = wandb.init(project=project, group=group, name=name, job_type="eval", dir=str(paths["json"].parent),
                     mode="offline" if offline else "online", reinit="finish_previous",
                     config={k: v for k, v in report.items() if k != "cells"})
    try:
        metric_names = sorted({m for c in report["cells"] for m in c["metrics"]})
        table = wandb.Table(columns=["sampler", "S", "NFE", "guidance_scale", *metric_names, "seconds", "config"])
        for cell in report["cells"]:
            table.add_data(cell_label(cell), cell["sampler"]["num_steps"], cell["nfe"], guidance(cell),
                           *[cell["metrics"].get(m) for m in metric_names], cell["seconds"],
                           json.dumps(cell["sampler"], sort_keys=True))
        run.log({"eval/cells": table, "eval/fid_vs_nfe": wandb.Image(str(paths["plot"]))})
        for cell in report["cells"]:
            if "fid" in cell["metrics"]:
                w = guidance(cell)
                key = f"eval/best_fid/{cell_label(cell)}" + (f" w={w:g}" if w != 1 else "")
                run.summary[key] = min(run.summary.get(key, float("inf")), cell["metrics"]["fid"])
        artifact = wandb.Artifact(f"fid-report-{report['checkpoint']['sha256'][:12]}", type="evaluation")
        artifact.add_file(str(paths["json"]))
        artifact.add_file(str(paths["markdown"]))
        run.log_artifact(artifact)
        return run.dir
    finally:
        run.finish()
