"""A sweep report: every run of a Hydra multirun folder (or any folder of run folders) in one table.

For each run: its overrides, status (failed runs keep their error), wall time, and the final and best value of
every logged metric (from ``csv/metrics.csv``). Written as ``sweep_report.md`` (sorted by the chosen metric,
showing only the overrides that differ between runs), ``sweep_report.csv`` (everything) and
``sweep_report.png`` (the metric and the training loss against steps, one line per run, and the metric against
wall time). Runs whose FID callback logged ``time/elapsed_min`` (the wall minutes of training at each evaluation)
are drawn as whole curves against wall time, and tabled step by step: with a constant learning rate after warm-up,
a run's value at step k is what a run of k steps would have scored, so one long run per setting answers "how long
must it train". Other runs are drawn as one point, their final value against the run's wall time.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from diffusion_lab.training.run_status import read_status
from diffusion_lab.utils.io import save_figure_atomic, write_text_atomic

HIGHER_IS_BETTER = ("val/is",)
ELAPSED = "time/elapsed_min"  # logged by FIDEvaluation with each evaluation


def timed_curve(run: dict[str, Any], metric: str) -> list[tuple[int, float, float]]:
    """[(step, elapsed minutes, metric)] at the run's evaluations that logged both (one per step: the last)."""
    elapsed = dict(run["history"].get(ELAPSED, []))
    values = dict(run["history"].get(metric, []))
    return [(step, elapsed[step], values[step]) for step in sorted(values) if step in elapsed]


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("status.json", ".hydra", "config.yaml"))


def _job_order(path: Path) -> tuple:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from ``csv/metrics.csv`` (empty when the run logged nothing)."""
    path = run_dir / "csv" / "metrics.csv"
    history: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return history
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                number = float(value)
                if math.isfinite(number):
                    history.setdefault(key, []).append((int(float(step)), number))
    return history


def read_overrides(run_dir: Path, status: dict[str, Any] | None) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in yaml.safe_load(path.read_text()) or []]
    return list((status or {}).get("overrides") or [])


def collect_runs(folder: str | Path) -> list[dict[str, Any]]:
    """One record per run folder directly under ``folder`` (job folders 0, 1, ... of a multirun, or run folders)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a multirun folder such as runs/digits/multirun_<date>")
    runs = []
    for run_dir in sorted((p for p in folder.iterdir() if is_run_dir(p)), key=_job_order):
        status = read_status(run_dir)
        history = read_metrics(run_dir)
        final = {k: v[-1][1] for k, v in history.items()}
        best, best_step = {}, {}
        for key, values in history.items():
            pick = max if higher_is_better(key) else min
            best_step[key], best[key] = pick(values, key=lambda sv: sv[1])
        state = (status or {}).get("status") or ("unknown (no status.json)" if history else "no record")
        runs.append({
            "job": run_dir.name, "path": str(run_dir), "overrides": read_overrides(run_dir, status),
            "status": state, "error": (status or {}).get("error"),
            "wall_seconds": (status or {}).get("wall_seconds"),
            "steps": max((s for values in history.values() for s, _ in values), default=0),
            "final": final, "best": best, "best_step": best_step, "history": history,
        })
    if not runs:
        raise FileNotFoundError(f"no run folders (with status.json, .hydra/ or config.yaml) under {folder}")
    return runs


def default_metric(runs: list[dict[str, Any]]) -> str:
    for name in ("val/fid", "val/kid", "train/loss"):
        if any(name in r["best"] for r in runs):
            return name
    return "train/loss"


def sort_runs(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Runs with the metric first, best first; then the rest (failed, no metric) in job order."""
    sign = -1.0 if higher_is_better(metric) else 1.0
    scored = sorted((r for r in runs if metric in r["best"]), key=lambda r: sign * r["best"][metric])
    return scored + [r for r in runs if metric not in r["best"]]


def varying_overrides(runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """(overrides common to every run, {job: the overrides that differ between runs})."""
    sets = [set(r["overrides"]) for r in runs]
    common = set.intersection(*sets) if sets else set()
    ordered_common = [o for o in runs[0]["overrides"] if o in common] if runs else []
    return ordered_common, {r["job"]: " ".join(o for o in r["overrides"] if o not in common) for r in runs}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def markdown(runs: list[dict[str, Any]], metric: str, folder: Path) -> str:
    runs = sort_runs(runs, metric)
    common, varying = varying_overrides(runs)
    extra = [m for m in ("val/fid", "val/is", "val/kid", "train/loss") if m != metric and any(m in r["final"] for r in runs)]
    better = "higher" if higher_is_better(metric) else "lower"
    lines = [f"# Sweep report: {folder}", "",
             f"{len(runs)} runs, sorted by best `{metric}` ({better} is better). "
             f"Completed: {sum(r['status'] == 'completed' for r in runs)}, "
             f"failed: {sum(r['status'] == 'failed' for r in runs)}.", ""]
    if common:
        lines += [f"Common overrides: `{' '.join(common)}`", ""]
    header = ["rank", "job", "overrides", "status", f"best {metric}", "at step", f"final {metric}"]
    header += [f"final {m}" for m in extra] + ["steps", "wall time"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, r in enumerate(runs, 1):
        has = metric in r["best"]
        row = [str(rank) if has else "-", r["job"], f"`{varying[r['job']]}`" if varying[r["job"]] else "-",
               r["status"], _fmt(r["best"].get(metric)), _fmt(r["best_step"].get(metric)),
               _fmt(r["final"].get(metric))]
        row += [_fmt(r["final"].get(m)) for m in extra] + [str(r["steps"]), _duration(r["wall_seconds"])]
        lines.append("| " + " | ".join(row) + " |")
    failed = [r for r in runs if r["error"]]
    if failed:
        lines += ["", "## Errors", ""]
        lines += [f"- job {r['job']} (`{varying[r['job']]}`): {r['error'].splitlines()[0]}" for r in failed]
    scored = [r for r in runs if metric in r["best"]]
    if len(scored) >= 2:
        first, second = scored[0], scored[1]
        a, b = first["best"][metric], second["best"][metric]
        lines += ["", f"Best: job {first['job']} (`{varying[first['job']] or 'no overrides'}`) with {metric} {a:.4g}, "
                      f"{abs(b - a):.3g} {'above' if higher_is_better(metric) else 'below'} the runner-up "
                      f"(job {second['job']}, {b:.4g})."]
    optuna = folder / "optimization_results.yaml"
    if optuna.is_file():
        results = yaml.safe_load(optuna.read_text())
        lines += ["", "## Optuna", "", f"Best parameters: `{results.get('best_params')}`, "
                  f"best value: {_fmt(results.get('best_value'))}"]
    curves = {r["job"]: timed_curve(r, metric) for r in runs}
    steps = sorted({s for c in curves.values() for s, _, _ in c})
    if steps:
        lines += ["", f"## {metric} against wall time", "",
                  f"Each evaluation's {metric} (wall minutes of training so far, that evaluation included).", "",
                  "| job | overrides | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|" + "---|" * (len(steps) + 2)]
        for r in runs:
            cells = {s: f"{v:.4g} ({m:.1f} min)" for s, m, v in curves[r["job"]]}
            if cells:
                lines.append(f"| {r['job']} | `{varying[r['job']] or '-'}` | "
                             + " | ".join(cells.get(s, "-") for s in steps) + " |")
    lines += ["", f"![{metric} and training loss per run](sweep_report.png)", ""]
    return "\n".join(lines)


def to_csv(runs: list[dict[str, Any]], metric: str) -> str:
    runs = sort_runs(runs, metric)
    names = sorted({k for r in runs for k in r["final"]})
    header = ["job", "status", "overrides", "wall_seconds", "steps"]
    header += [f"final {n}" for n in names] + [f"best {n}" for n in names] + [f"best_step {n}" for n in names]
    header += ["error", "path"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for r in runs:
        writer.writerow([r["job"], r["status"], " ".join(r["overrides"]), r["wall_seconds"], r["steps"]]
                        + [r["final"].get(n, "") for n in names] + [r["best"].get(n, "") for n in names]
                        + [r["best_step"].get(n, "") for n in names] + [r["error"] or "", r["path"]])
    return buffer.getvalue()


def _smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[dict[str, Any]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, varying = varying_overrides(runs)
    panels = [metric] + (["train/loss"] if metric != "train/loss" else [])
    curves = {r["job"]: timed_curve(r, metric) for r in runs}
    timed = [r for r in runs if curves[r["job"]] or (r["wall_seconds"] and metric in r["final"])]
    # the legend goes below the panels, two runs to a row: a sweep's override lists are too long for inside one
    longest = max((len(f"{r['job']}: {varying[r['job']]}") for r in runs), default=0)
    ncol = 2 if len(runs) > 1 and longest <= 110 else 1
    legend_inches = 0.3 + 0.2 * math.ceil(len(runs) / ncol)
    width, height = 6 * (len(panels) + bool(timed)), 4.5 + legend_inches
    fig, axes = plt.subplots(1, len(panels) + bool(timed), figsize=(width, height), squeeze=False)
    if timed:  # the trade-off a recipe is chosen on: the metric against wall time
        ax = axes[0][-1]
        for r in timed:
            if curves[r["job"]]:  # the whole curve: each evaluation at the wall time training had taken by then
                _, minutes, values = zip(*curves[r["job"]])
                ax.plot(minutes, values, marker="o", markersize=3, label=f"{r['job']}: {varying[r['job']] or '-'}")
                point = (minutes[-1], values[-1])
            else:  # the final value against the run's wall time
                point = (r["wall_seconds"] / 60, r["final"][metric])
                ax.scatter(*point, s=30)
            ax.annotate(f"{r['job']}", point, textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel("wall time of training (min)")
        ax.set_ylabel(metric)
        if metric == "val/fid":
            ax.set_yscale("log")
        ax.set_title(f"{metric} vs wall time")
        ax.grid(True, which="both", alpha=0.3)
    for ax, name in zip(axes[0], panels):
        for r in runs:
            points = r["history"].get(name)
            if not points:
                continue
            steps, values = [p[0] for p in points], [p[1] for p in points]
            if name == "train/loss":
                values = _smooth(values)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3,
                    label=f"{r['job']}: {varying[r['job']] or '-'}")
        ax.set_xlabel("training step")
        ax.set_ylabel(name + (" (running mean of 20 logs)" if name == "train/loss" else ""))
        if name in ("val/fid", "train/loss"):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(name)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    save_figure_atomic(fig, path)


def write_sweep_report(folder: str | Path, metric: str | None = None, out: str | Path | None = None) -> dict[str, Path]:
    """Collect the runs under ``folder`` and write the report there (or in ``out``); returns the file paths."""
    folder = Path(folder)
    runs = collect_runs(folder)
    metric = metric or default_metric(runs)
    out_dir = Path(out) if out else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "sweep_report.md", "csv": out_dir / "sweep_report.csv",
             "plot": out_dir / "sweep_report.png"}
    write_text_atomic(paths["markdown"], markdown(runs, metric, folder))
    write_text_atomic(paths["csv"], to_csv(runs, metric))
    plot(runs, metric, paths["plot"])
    return paths
