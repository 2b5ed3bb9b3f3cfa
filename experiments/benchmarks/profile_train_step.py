"""Where a training step's time goes: torch.profiler over a few plain-loop steps of an experiment's module.

    python experiments/benchmarks/profile_train_step.py --experiment ddpm_cifar10 --precision bf16-mixed
    python experiments/benchmarks/profile_train_step.py --experiment digits --accelerator cpu --batch-size 128

The step is train_throughput.py's plain loop (the module's loss, backward, clipping, fused Adam, EMA update) on
synthetic data of the experiment's shape. Prints the wall time per step, the device's busy time per step (the sum
of its kernels' time: wall >> busy means the device waits for the host, i.e. launch overhead or host syncs),
and the top operators by device (or CPU) self time. Hydra overrides (``key=value``) may follow.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.optim.swa_utils import AveragedModel
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import build, compose_config, split_argv  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    options, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ddpm_cifar10")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--torch-ema", action="store_true",
                        help="update the EMA with torch's AveragedModel.update_parameters (two host syncs per step)")
    args = parser.parse_args(options)
    args.steps_total = args.warmup + args.steps
    cuda = args.accelerator == "gpu"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ns = argparse.Namespace(experiment=args.experiment, batch_size=args.batch_size, accelerator=args.accelerator,
                            warmup=args.warmup, steps=args.steps)
    cfg = compose_config(ns, overrides, args.precision, args.compile, args.channels_last)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark", False))
    datamodule, module = build(cfg)
    device = torch.device("cuda" if cuda else "cpu")
    module.to(device)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())).to(device), 0)
    if module.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    config = module.configure_optimizers()
    optimizer = config if isinstance(config, torch.optim.Optimizer) else config["optimizer"]
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype) if args.precision.endswith("-mixed") else nullcontext()

    def step() -> None:
        with autocast:
            per_example, _ = module.diffusion.loss(module._train_net, batch)
            loss = per_example.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), cfg.trainer.gradient_clip_val, foreach=True)
        optimizer.step()
        if args.torch_ema:
            AveragedModel.update_parameters(module.ema, module.net)
        else:
            module.ema.update_parameters(module.net)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    # Kernels only (device-side events): operator rows also carry their kernels' time and would count it twice.
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / args.steps / 1e6 \
        if cuda else None
    print(events.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    label = (f"{args.experiment} {args.precision}" + " + compile" * args.compile + " + channels_last" * args.channels_last
             + " + torch EMA" * args.torch_ema + (f" {' '.join(overrides)}" if overrides else ""))
    line = f"{label}: batch {args.batch_size}, wall {1e3 * wall:.1f} ms/step ({args.batch_size / wall:.0f} images/s)"
    if busy is not None:
        line += f", device busy {1e3 * busy:.1f} ms/step ({100 * busy / wall:.0f}% of wall)"
    print(line, flush=True)


if __name__ == "__main__":
    main()
