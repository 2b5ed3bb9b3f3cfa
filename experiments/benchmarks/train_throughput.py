"""Training throughput (images/s) of an experiment's model on synthetic data, for several precisions side by side.

    python experiments/benchmarks/train_throughput.py --experiment ddpm_cifar10 --precisions 32-true bf16-mixed
    python experiments/benchmarks/train_throughput.py --experiment digits --accelerator cpu --steps 20

Runs the real Lightning training step (loss, backward, clipping, Adam, EMA update) through ``trainer.fit`` with
no logging or checkpointing, skips ``--warmup`` steps (allocation, cuDNN autotuning, compilation) and times the
next ``--steps``. Prints one line per setting and the ratio to the first. Ratios within one run are the figure
to quote; absolute times on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        self._sync()
        self.end = time.perf_counter()


def measure(args: argparse.Namespace, precision: str, compile_net: bool) -> float:
    overrides = [f"experiment={args.experiment}", "data=synthetic", f"data.batch_size={args.batch_size}",
                 f"model.compile={str(compile_net).lower()}"]
    with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides + args.overrides)
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, _partial_=True)(diffusion=instantiate(cfg.diffusion), sampler=None)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, precision=precision, max_steps=args.warmup + args.steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return args.steps * args.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ddpm_cifar10")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="also measure each precision with torch.compile")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.image_size=64")
    args = parser.parse_args()
    if args.accelerator == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.experiment}: batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, on {device}")
    results = []
    for precision in args.precisions:
        for compile_net in ([False, True] if args.compile else [False]):
            ips = measure(args, precision, compile_net)
            results.append(ips)
            label = precision + (" + compile" if compile_net else "")
            print(f"{label:24s} {ips:10.1f} images/s   x{ips / results[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
