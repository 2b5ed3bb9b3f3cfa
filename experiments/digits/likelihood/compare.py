"""L_simple vs L_hybrid on digits: one table and one plot of the bound's terms per t from the two eval reports.

    python experiments/digits/likelihood/compare.py        # reads simple/report.json and hybrid/report.json

Writes ``comparison.md`` (bits/dim with its parts, FID +- sd per sampler) and ``bound_terms.png`` (L_{t-1}
against t for both models on one log scale, and their difference per t for t < 50) next to this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = {"L_simple (fixed_large)": HERE / "simple" / "report.json",
        "L_hybrid (learned_range)": HERE / "hybrid" / "report.json"}


def sampler_label(sampler: dict) -> str:
    if sampler["name"] == "ddim":
        return f"DDIM-{sampler['num_steps']}"
    return f"DDPM-{sampler['num_steps']}"


def main() -> None:
    reports = {name: json.loads(path.read_text()) for name, path in RUNS.items()}
    columns = ["DDPM-1000", "DDPM-50", "DDIM-50"]
    lines = ["| objective | bits/dim (+- s.e.) | L_0 decoder | sum L_1..L_(T-1) | L_T prior | "
             + " | ".join(f"FID {c}" for c in columns) + " |",
             "|---" * (5 + len(columns)) + "|"]
    for name, report in reports.items():
        nll = report["nll"]
        fids = {sampler_label(c["sampler"]): c["metrics"] for c in report["cells"]}
        cells = [f"{fids[c]['fid']:.2f} +- {fids[c]['fid_std']:.2f}" if c in fids else "" for c in columns]
        lines.append(f"| {name} | {nll['bpd']:.3f} +- {nll['bpd_std_err']:.3f} | {nll['decoder_bpd']:.3f} | "
                     f"{nll['kl_bpd']:.3f} | {nll['prior_bpd']:.1e} | " + " | ".join(cells) + " |")
    first = next(iter(reports.values()))
    lines += ["", f"{first['num_samples']} samples per FID cell (seed {first['seed']}) against all 1,797 digits; "
              f"the bound over the first {first['nll']['num_images']} training digits "
              f"({first['nll']['quantization_levels']}-level bins). Each DDPM row uses the model's own variance."]
    (HERE / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    terms = {name: report["nll"]["terms_per_t"] for name, report in reports.items()}
    for name, report in reports.items():
        axes[0].semilogy(range(len(terms[name])), terms[name], lw=1,
                         label=f"{name}: {report['nll']['bpd']:.3f} bits/dim")
    axes[0].set_title("L_{t-1} against t")
    axes[0].set_ylabel("L_{t-1} (bits/dim)")
    axes[0].legend(fontsize=8)
    (simple_name, simple), (hybrid_name, hybrid) = terms.items()
    stop = 50
    axes[1].bar(range(stop), [a - b for a, b in zip(simple[:stop], hybrid[:stop])], width=0.8)
    axes[1].set_title(f"{simple_name.split()[0]} minus {hybrid_name.split()[0]}, t < {stop}")
    axes[1].set_ylabel("difference of L_{t-1} (bits/dim)")
    for ax in axes:
        ax.set_xlabel("t (0 = decoder term L_0)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(HERE / "bound_terms.png", dpi=120)
    print(f"plot: {HERE / 'bound_terms.png'}")


if __name__ == "__main__":
    main()
