"""``diffusion-lab-report <multirun folder>``: one table (Markdown + CSV) and a plot of every run in a sweep."""

from __future__ import annotations

import argparse
import sys

from diffusion_lab.cli.guard import main_guard
from diffusion_lab.reports.sweep import write_sweep_report


@main_guard  # a UserError from the report code: one line on stderr, exit status 2
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="diffusion-lab-report",
        description="Collect every run of a Hydra multirun folder (or any folder of run folders): overrides, "
                    "status and error, wall time, final and best metrics, each FID against wall time. Writes "
                    "sweep_report.md, .csv and .png.")
    parser.add_argument("folder", help="e.g. runs/digits/multirun_2026-11-22_10-00-00")
    parser.add_argument("--metric", default=None,
                        help="the metric to sort by and plot (default: val/fid if logged, else train/loss)")
    parser.add_argument("--out", default=None, help="where to write the report (default: the folder itself)")
    args = parser.parse_args(argv)
    try:
        paths = write_sweep_report(args.folder, args.metric, args.out)
    except FileNotFoundError as error:
        print(f"diffusion-lab-report: {error}", file=sys.stderr)
        return 2
    print(paths["markdown"].read_text())
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
