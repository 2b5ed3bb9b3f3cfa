"""Sampling throughput of an experiment's U-Net: images/s and network evaluations/s, per precision, with and
without torch.compile, on CPU or GPU; FLOPs per evaluation counted by torch.utils.flop_counter.

    python experiments/benchmarks/sample_throughput.py --experiment ddpm_cifar10 --batch-size 256 \
        --precisions 32 bf16-mixed --compile
    python experiments/benchmarks/sample_throughput.py --experiment digits --batch-size 256 --rounds 5

Times DDIM steps (the network call plus the sampler's float32 update, through the same ``sampling_net``
wrapper diffusion-lab-eval uses) on random weights: speed does not depend on what the weights are. Settings are
measured in interleaved rounds and the median is reported, so ratios within one run are the figure to quote;
absolute times on shared machines are noisy. On a GPU it also prints the achieved TFLOP/s as a fraction of the
device's dense peak for that precision (table below; unknown devices print no fraction). Writes a JSON record.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab.loading import sampling_net
from diffusion_lab.samplers import DDIMSampler

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets: fp32 (CUDA cores), tf32, bf16/fp16 tensor
# cores. The first name that is a substring of torch.cuda.get_device_name() wins ("NVIDIA H100 80GB HBM3" is SXM).
PEAK_TFLOPS = [
    ("H100 PCIe", {"32": 51.2, "tf32": 378.0, "bf16-mixed": 756.0, "16-mixed": 756.0}),
    ("H100", {"32": 67.0, "tf32": 494.7, "bf16-mixed": 989.4, "16-mixed": 989.4}),
    ("H200", {"32": 67.0, "tf32": 494.7, "bf16-mixed": 989.4, "16-mixed": 989.4}),
    ("A100", {"32": 19.5, "tf32": 156.0, "bf16-mixed": 312.0, "16-mixed": 312.0}),
    ("L40S", {"32": 91.6, "tf32": 183.0, "bf16-mixed": 362.0, "16-mixed": 362.0}),
    ("A10", {"32": 31.2, "tf32": 62.5, "bf16-mixed": 125.0, "16-mixed": 125.0}),
]


def peak_tflops(device_name: str, precision: str, tf32: bool) -> float | None:
    key = "tf32" if precision == "32" and tf32 else precision
    return next((peaks.get(key) for name, peaks in PEAK_TFLOPS if name in device_name), None)


def build_net(experiment: str, overrides: list[str]):
    with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides])
    torch.manual_seed(0)
    return instantiate(cfg.model.net).eval(), instantiate(cfg.diffusion)


def flops_per_evaluation(net, shape: tuple[int, ...], device: torch.device) -> int:
    """FLOPs of one forward pass on one image (counted at batch 2 and halved, so batch-norm-free ops count)."""
    x = torch.randn(2, *shape, device=device)
    t = torch.tensor([10, 500], device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t)
    return counter.get_total_flops() // 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(net, diffusion, batch: int, shape: tuple[int, ...], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` DDIM steps on a batch (the sampler loop as evaluation runs it)."""
    sampler = DDIMSampler(num_steps=steps)
    sync(device)
    start = time.perf_counter()
    sampler.sample(net, diffusion, (batch, *shape), seed=0, device=device)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="digits", help="digits | ddpm_cifar10 | ...")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="also measure each precision with torch.compile")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (network evaluations) per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds; the median is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls for precision 32 on a GPU")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument("--out", default=None, help="JSON record path (default: sample_throughput_<exp>.json)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides of the train config")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    net, diffusion = build_net(args.experiment, args.overrides)
    net, diffusion = net.to(device), diffusion.to(device)
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    flops = flops_per_evaluation(net, shape, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in net.parameters())
    print(f"{args.experiment}: {params / 1e6:.2f}M parameters, {flops / 1e9:.3f} GFLOP per network evaluation "
          f"(FlopCounterMode), batch {args.batch_size}, {args.steps} DDIM steps per round, {args.rounds} rounds, "
          f"on {name}", flush=True)

    settings = [(p, c) for p in args.precisions for c in ([False, True] if args.compile else [False])]
    nets = {s: sampling_net(net, s[0], s[1]) for s in settings}
    for s in settings:  # warm-up: allocation, autotuning, compilation (one short sample per setting)
        time_steps(nets[s], diffusion, args.batch_size, shape, 2, device)
    seconds: dict[tuple[str, bool], list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for s in settings:
            seconds[s].append(time_steps(nets[s], diffusion, args.batch_size, shape, args.steps, device))

    rows = []
    for s in settings:
        median = statistics.median(seconds[s])
        evals_per_s = args.batch_size * args.steps / median  # one network evaluation = one image at one step
        row = {"precision": s[0], "compile": s[1], "seconds_per_round": [round(x, 4) for x in seconds[s]],
               "network_evaluations_per_s": evals_per_s, "images_per_s_at_nfe": {str(n): evals_per_s / n
                                                                                 for n in (10, 20, 50, 100, 1000)},
               "tflops": evals_per_s * flops / 1e12}
        peak = peak_tflops(name, s[0], args.tf32) if device.type == "cuda" else None
        row["fraction_of_peak"] = row["tflops"] / peak if peak else None
        rows.append(row)
        label = s[0] + (" + compile" if s[1] else "")
        frac = f"   {100 * row['fraction_of_peak']:.1f}% of peak" if peak else ""
        print(f"{label:22s} {evals_per_s:10.1f} network evals/s   {evals_per_s / 50:8.2f} images/s at 50 NFE   "
              f"{row['tflops']:.3f} TFLOP/s   x{evals_per_s / rows[0]['network_evaluations_per_s']:.2f}{frac}",
              flush=True)
    record = {"experiment": args.experiment, "device": name, "batch_size": args.batch_size, "steps": args.steps,
              "rounds": args.rounds, "parameters": params, "flops_per_evaluation": flops, "tf32": args.tf32, "cudnn_benchmark": args.cudnn_benchmark,
              "torch": torch.__version__, "results": rows}
    out = Path(args.out or f"sample_throughput_{args.experiment}.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {out}")


if __name__ == "__main__":
    main()
