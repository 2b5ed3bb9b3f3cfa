"""The few-step table and plot: FID +- sd, IS, precision and recall against network evaluations (NFE).

Reads ``diffusion-lab-eval`` reports (report.json): the training-free solvers on the teacher checkpoint and one
report per distilled student, and writes ``table.md`` (one table per metric, rows = sampler, columns = NFE) and
``fid_vs_nfe.png`` (FID against NFE with bootstrap-sd error bars, the teacher's DDPM-1000 as a dashed line).

    python experiments/digits/few_step/table.py \\
        --solvers experiments/digits/few_step/solvers/report.json \\
        --students experiments/digits/few_step/students/*/report.json \\
        --rounds experiments/digits/few_step/distillation.json --out experiments/digits/few_step

Rows are named by each cell's own sampler label (``Sampler.label()``, saved in the report); a student's row is
"progressive distillation" and its NFE is its own step count. ``--rounds`` (optional) is the distillation run's
``checkpoints/distillation.json`` (each phase's training steps, wall and CPU seconds), written as a table under the
metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NFES = (1, 2, 3, 4, 5, 6, 8, 10, 20)
METRICS = (("fid", "FID +- bootstrap sd (lower is better)"), ("is", "IS (higher is better)"),
           ("precision", "Precision (higher is better)"), ("recall", "Recall (higher is better)"))
STUDENT = "progressive distillation (student, DDIM)"


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def label(cell: dict) -> str:
    if cell.get("label"):
        return cell["label"]
    from diffusion_lab.reports.fid_report import label_of

    return label_of(cell["sampler"])


def rows_of(solvers: dict, students: list[dict]) -> tuple[dict[str, dict[int, dict]], dict | None]:
    """{row: {nfe: cell}} and the reference cell (the most NFE: the teacher's DDPM-1000)."""
    rows: dict[str, dict[int, dict]] = {}
    baseline = max(solvers["cells"], key=lambda c: c["nfe"]) if solvers["cells"] else None
    for cell in solvers["cells"]:
        if cell is baseline:
            continue
        rows.setdefault(label(cell), {})[cell["nfe"]] = cell
    for report in students:
        for cell in report["cells"]:
            rows.setdefault(STUDENT, {})[cell["nfe"]] = cell
    return rows, baseline


def text(cell: dict | None, metric: str) -> str:
    if cell is None or metric not in cell["metrics"]:
        return ""
    value = cell["metrics"][metric]
    out = f"{value:.{3 if metric in ('precision', 'recall') else 2}f}"
    if metric == "fid" and "fid_std" in cell["metrics"]:
        out += f" +- {cell['metrics']['fid_std']:.2f}"
    return out


def markdown(rows: dict[str, dict[int, dict]], baseline: dict | None, rounds: list[dict] | None, solvers: dict) -> str:
    nfes = sorted({n for row in rows.values() for n in row if n <= max(NFES)} | set(NFES))
    lines = [f"{solvers['num_samples']:,} samples per cell (image i from noise seeded by ({solvers['seed']}, i)) "
             f"against all {solvers['reference']['num_images']:,} digits, features: {solvers['extractor']}; "
             f"teacher checkpoint sha256 {solvers['checkpoint']['sha256'][:16]}.", ""]
    if baseline is not None:
        lines += [f"Reference: the teacher with {label(baseline)} at {baseline['nfe']} NFE: FID "
                  f"{text(baseline, 'fid')}, IS {text(baseline, 'is')}, precision {text(baseline, 'precision')}, "
                  f"recall {text(baseline, 'recall')}.", ""]
    for metric, title in METRICS:
        lines += [f"## {title}", "", "| sampler \\ NFE | " + " | ".join(map(str, nfes)) + " |",
                  "|---|" + "---|" * len(nfes)]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(text(row.get(n), metric) for n in nfes) + " |")
        lines.append("")
    if rounds:
        lines += ["## Distillation phases (CPU cost)", "",
                  "| phase | teacher -> student DDIM steps | training steps | wall s | CPU s |", "|---|---|---|---|---|"]
        for r in rounds["phases"]:
            name = "reparameterisation to v" if r["phase"] == "reparam" else f"round {r['round']}"
            steps = f"{r['teacher_num_steps']} -> {r['num_steps']}" if r["phase"] == "round" else "-"
            lines.append(f"| {name} | {steps} | {r['steps']} | {r['wall_seconds']:.0f} | {r['cpu_seconds']:.0f} |")
        total = sum(r["cpu_seconds"] for r in rounds["phases"])
        lines += ["", f"CPU seconds are the process's CPU time (1 thread), including each round's checkpoint and sample "
                      f"grid; {total / 60:.1f} CPU-minutes in all.", ""]
    lines += ["NFE: network evaluations per image (Heun: 2S - 1 for S steps, so only odd NFE). Empty cells were not "
              "run. sd: FID's standard deviation over 20 bootstrap resamples of the generated features (sampling "
              "noise of 1,000 images, not training noise).", ""]
    return "\n".join(lines)


def plot(rows: dict[str, dict[int, dict]], baseline: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = plt.get_cmap("tab20").colors
    for k, (name, row) in enumerate(rows.items()):
        nfes = sorted(n for n in row if "fid" in row[n]["metrics"])
        style = dict(color="black", linewidth=2.2, marker="s") if name == STUDENT else dict(
            marker="o", markersize=4, color=colours[(2 * k) % 20 + (2 * k) // 20],
            linestyle="--" if "clip_denoised=True" in name else "-")  # clipped x0: dashed
        ax.errorbar(nfes, [row[n]["metrics"]["fid"] for n in nfes],
                    yerr=[row[n]["metrics"].get("fid_std", 0.0) for n in nfes], capsize=3, label=name, **style)
    if baseline is not None:
        fid, sd = baseline["metrics"]["fid"], baseline["metrics"].get("fid_std", 0.0)
        ax.axhline(fid, color="grey", linestyle="--", label=f"teacher {label(baseline)} ({baseline['nfe']} NFE)")
        ax.axhspan(fid - sd, fid + sd, color="grey", alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(NFES)
    ax.set_xticklabels([str(n) for n in NFES])
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("FID (error bars: bootstrap sd)")
    ax.set_title("Digits: FID vs NFE, training-free solvers and progressive distillation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", type=Path, required=True, help="report.json of the training-free grid")
    parser.add_argument("--students", type=Path, nargs="*", default=[], help="report.json of each student")
    parser.add_argument("--rounds", type=Path, default=None, help="the distillation run's rounds.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    solvers = load(args.solvers)
    rows, baseline = rows_of(solvers, [load(p) for p in args.students])
    rounds = load(args.rounds) if args.rounds else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(markdown(rows, baseline, rounds, solvers))
    plot(rows, baseline, args.out / "fid_vs_nfe.png")
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
