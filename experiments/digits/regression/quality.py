"""Digits quality of trained checkpoints on several samplers and two independent extractors (issue 17).

For each checkpoint: 1,000 EMA samples, image i from (seed 0, i), clamped to [-1, 1], drawn with
- DDIM eta=0, 50 steps, unclipped;   - DPM-Solver++(2M), 10 steps, unclipped;
- DPM-Solver++(2M), 20 steps, x0 clipped (the training callback's sampler);   - DDPM-1000 (``--ddpm``, slow);
and scored by FID against all 1,797 digits with the digits CNN (``digits-classifier``, the project's val/fid
extractor) and with pixel-space statistics (``digits-pixels``, no network), plus IS and the mean and standard
deviation of the pixel values against the data's. Writes one JSON line per (checkpoint, sampler) to ``--out``.

``--gate`` checks the scores against the default run's bands (``callbacks.fid.gate`` of
conf/experiment/digits.yaml, the same names the training callback logs) and exits 1 outside them:

    python experiments/digits/regression/quality.py runs/a/checkpoints/last.ckpt runs/b/... --out q.jsonl
    python experiments/digits/regression/quality.py runs/digits/<run>/checkpoints/last.ckpt --gate
    python experiments/digits/regression/quality.py --report q.jsonl --label runs/a=A --plot q.png --gate
    python experiments/digits/regression/quality.py <ckpt> --eps-scale 1.05 --gate   # a degraded model must fail

The record of issue 17 (four runs, the bands, what fails them): README.md beside this file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffusion_lab.callbacks.evaluation import fid_name
from diffusion_lab.loading import load_model
from diffusion_lab.metrics.extractors import digits_split, make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig, compute_metrics, extract
from diffusion_lab.metrics.gate import check_gate
from diffusion_lab.metrics.reference import reference_from_features
from diffusion_lab.samplers import DDIMSampler, DDPMSampler, DPMSolverSampler
from diffusion_lab.utils.images import to_uint8

EXTRACTORS = ("digits-classifier", "digits-pixels")
# what the training callback calls these samplers (conf/experiment/digits.yaml): its main one and an extra one
LOGGED = {"dpm20_clip": "", "ddim50": "ddim50"}
SAMPLERS = {
    "ddim50": DDIMSampler(num_steps=50, eta=0.0, clip_denoised=False),
    "dpm10": DPMSolverSampler(num_steps=10, clip_denoised=False),
    "dpm20_clip": DPMSolverSampler(num_steps=20, clip_denoised=True),
}


class ScaledEps(torch.nn.Module):
    """A deliberately degraded model: the wrapped net's eps prediction times ``scale`` (a biased denoiser: its x0
    predictions overshoot, which x0 clipping partly hides and an unclipped sampler does not)."""

    def __init__(self, net: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t) * self.scale


def digits_images() -> torch.Tensor:
    """All 1,797 digits in [-1, 1] (the reference set of the training FID)."""
    x, _, x_test, _ = digits_split(0)
    return torch.cat([x, x_test]) * 2 - 1


def references(extractors: dict) -> dict:
    real = to_uint8(digits_images())
    return {name: reference_from_features(extract(e, [real])[0]) for name, e in extractors.items()}


def score(images: torch.Tensor, extractors: dict, refs: dict, real: torch.Tensor) -> dict:
    out = {"pixel_mean": images.mean().item(), "pixel_std": images.std().item(),
           "data_pixel_mean": real.mean().item(), "data_pixel_std": real.std().item()}
    for name, extractor in extractors.items():
        features, logits = extract(extractor, [to_uint8(images)])
        config = MetricsConfig(fid=True, isc=logits.shape[1] > 0, fid_bootstrap=20)
        scores = compute_metrics(features, logits, refs[name], config)
        out[f"fid[{name}]"], out[f"fid_std[{name}]"] = scores["fid"], scores["fid_std"]
        if "is" in scores:
            out[f"is[{name}]"] = scores["is"]
    return out


def gate_bounds() -> dict[str, float]:
    """The default run's bands: ``callbacks.fid.gate`` of conf/experiment/digits.yaml."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[3] / "conf" / "experiment" / "digits.yaml"
    return dict(OmegaConf.load(conf).callbacks.fid.gate)


def logged_scores(rows: list[dict]) -> dict[str, float]:
    """One checkpoint's rows under the names the training callback logs (val/fid, val/fid_ddim50_digits-pixels...)."""
    out = {}
    for row in rows:
        if row["sampler"] in LOGGED:
            for i, extractor in enumerate(EXTRACTORS):  # the first is the callback's main extractor
                out[fid_name(LOGGED[row["sampler"]], extractor if i else "")] = row[f"fid[{extractor}]"]
    return out


def run_name(row: dict, labels: dict[str, str]) -> str:
    name = next((v for k, v in labels.items() if k in row["checkpoint"]), row["checkpoint"])
    return f"{name}, eps x{row['eps_scale']:g}" if "eps_scale" in row else name


def table(rows: list[dict], labels: dict[str, str]) -> str:
    """Markdown: one row per (run, sampler): FID +- sd with both extractors, IS, pixel mean / std."""
    lines = ["| run | sampler | FID digits-classifier | FID digits-pixels | IS | pixel mean / std (data) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {run_name(row, labels)} | {row['sampler']} "
            f"| {row['fid[digits-classifier]']:.2f} +- {row['fid_std[digits-classifier]']:.2f} "
            f"| {row['fid[digits-pixels]']:.2f} +- {row['fid_std[digits-pixels]']:.2f} "
            f"| {row.get('is[digits-classifier]', float('nan')):.2f} "
            f"| {row['pixel_mean']:.3f} / {row['pixel_std']:.3f} ({row['data_pixel_mean']:.3f} / "
            f"{row['data_pixel_std']:.3f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], labels: dict[str, str], path: str) -> None:
    """FID +- bootstrap sd per sampler (x) for every run (colour), one panel per extractor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    runs = list(dict.fromkeys(run_name(r, labels) for r in rows))
    fig, axes = plt.subplots(1, len(EXTRACTORS), figsize=(5 * len(EXTRACTORS), 3.6))
    for ax, extractor in zip(axes, EXTRACTORS):
        for j, run in enumerate(runs):
            mine = {r["sampler"]: r for r in rows if run_name(r, labels) == run}
            xs = [i + (j - (len(runs) - 1) / 2) * 0.12 for i, s in enumerate(samplers) if s in mine]
            ys = [mine[s][f"fid[{extractor}]"] for s in samplers if s in mine]
            es = [mine[s][f"fid_std[{extractor}]"] for s in samplers if s in mine]
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=run)
        ax.set_xticks(range(len(samplers)), samplers)
        ax.set_ylabel(f"FID ({extractor}), +- bootstrap sd")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("1,000 EMA samples per cell against all 1,797 digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--out", help="append the rows (JSON lines) to this file")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--ddpm", action="store_true", help="also DDPM-1000 (1,000 network calls per image)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--eps-scale", type=float, default=1.0,
                        help="degrade the model on purpose: its eps prediction times this (to check the gate)")
    parser.add_argument("--gate", action="store_true",
                        help="exit 1 when a checkpoint is outside the default run's bands")
    parser.add_argument("--report", metavar="JSONL", help="only summarise rows written by --out: a markdown table "
                        "(stdout) and, with --plot, a figure; no sampling")
    parser.add_argument("--plot", metavar="PNG")
    parser.add_argument("--label", action="append", default=[], metavar="SUBSTRING=NAME",
                        help="name the runs whose checkpoint path contains SUBSTRING (repeatable)")
    args = parser.parse_args(argv)
    if args.report:
        rows = [json.loads(line) for line in Path(args.report).read_text().splitlines() if line.strip()]
        labels = dict(item.split("=", 1) for item in args.label)
        print(table(rows, labels))
        if args.plot:
            plot(rows, labels, args.plot)
        if not args.gate:
            return 0
        runs: dict[str, list[dict]] = {}
        for row in rows:
            runs.setdefault(run_name(row, labels), []).append(row)
        return 1 if any([gate_check(name, mine) for name, mine in runs.items()]) else 0
    extractors = {name: make_extractor(name) for name in EXTRACTORS}
    refs, real = references(extractors), digits_images()
    samplers = {k: SAMPLERS[k] for k in args.samplers.split(",") if k}
    if args.ddpm:
        samplers["ddpm1000"] = DDPMSampler(variance="fixed_large", clip_denoised=True)
    failed = False
    for ckpt in args.checkpoints:
        model = load_model(ckpt)
        shape = (model.net.config.in_channels, model.net.config.image_size, model.net.config.image_size)
        net = model.net if args.eps_scale == 1 else ScaledEps(model.net, args.eps_scale)
        rows = []
        for name, sampler in samplers.items():
            start = time.perf_counter()
            with torch.no_grad():
                images = torch.cat([
                    sampler.sample(net, model.diffusion, (len(chunk), *shape), seed=0, indices=chunk)
                    for chunk in torch.arange(args.num_samples).split(250)
                ]).clamp(-1, 1)
            rows.append({"checkpoint": str(ckpt), "sampler": name, "num_samples": args.num_samples,
                         **({"eps_scale": args.eps_scale} if args.eps_scale != 1 else {}),
                         **score(images, extractors, refs, real), "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
        if args.gate:
            failed |= bool(gate_check(run_name(rows[-1], {}), rows))
    return 1 if failed else 0


def gate_check(name: str, rows: list[dict]) -> list[str]:
    """Print and return one run's failures against the default run's bands."""
    failures = check_gate(logged_scores(rows), gate_bounds())
    for failure in failures:
        print(f"GATE FAILED {name}: {failure}")
    if not failures:
        print(f"gate passed {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in logged_scores(rows).items()))
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
