"""Where a training step's time goes: torch.profiler over a few plain-loop steps of an experiment's module.

    python experiments/benchmarks/profile_train_step.py --experiment ddpm_cifar10 --precision bf16-mixed
    python experiments/benchmarks/profile_train_step.py --experiment digits --accelerator cpu --batch-size 128

The step is train_throughput.py's plain loop (the module's loss, backward, clipping, Adam, LR schedule, EMA) on
synthetic data of the experiment's shape. Prints the wall time per step, the device's busy time per step (the sum
of its kernels' time: wall >> busy means the device waits for the host, i.e. launch overhead or host syncs),
and the top operators by device (or CPU) self time. Hydra overrides (``key=value``) may follow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.optim.swa_utils import AveragedModel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import _sync, compose_config, plain_step, seconds_per_step, split_argv  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    options, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ddpm_cifar10")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        help="a model.compile mode (default | reduce-overhead | max-autotune-no-cudagraphs)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--torch-ema", action="store_true",
                        help="update the EMA with torch's AveragedModel.update_parameters (two host syncs per step)")
    args = parser.parse_args(options)
    cuda = args.accelerator == "gpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ns = argparse.Namespace(experiment=args.experiment, batch_size=args.batch_size, accelerator=args.accelerator,
                            warmup=args.warmup, steps=args.steps)
    cfg = compose_config(ns, overrides, args.precision, args.compile or False, args.channels_last)
    torch_ema = (lambda module: AveragedModel.update_parameters(module.ema, module.net)) if args.torch_ema else None
    step = plain_step(cfg, args.accelerator, ema_update=torch_ema)
    wall = seconds_per_step(step, args.warmup, args.steps)
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        _sync()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # Kernels only (device-side events): operator rows also carry their kernels' time and would count it twice.
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / args.steps / 1e6 \
        if cuda else None
    print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    label = (f"{args.experiment} {args.precision}" + (f" + compile {args.compile}" if args.compile else "")
             + " + channels_last" * args.channels_last
             + " + torch EMA" * args.torch_ema + (f" {' '.join(overrides)}" if overrides else ""))
    line = f"{label}: batch {args.batch_size}, wall {1e3 * wall:.1f} ms/step ({args.batch_size / wall:.0f} images/s)"
    if busy is not None:
        line += f", device busy {1e3 * busy:.1f} ms/step ({100 * busy / wall:.0f}% of wall)"
    print(line, flush=True)


if __name__ == "__main__":
    main()
