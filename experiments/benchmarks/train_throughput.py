"""Training throughput (images/s) of an experiment's model on synthetic data of its shape, and Lightning's overhead.

    python experiments/benchmarks/train_throughput.py --experiment ddpm_cifar10 --precisions 32-true bf16-mixed --compile --channels-last
    python experiments/benchmarks/train_throughput.py --experiment ddpm_cifar10 trainer=bf16 data.batch_size=128
    python experiments/benchmarks/train_throughput.py --experiment digits --accelerator cpu --steps 20

Runs the real Lightning training step (loss, backward, clipping, Adam, EMA update) through ``trainer.fit`` with
the trainer built from the experiment's own ``trainer`` config group (so ``trainer=bf16``/``ddp`` here are the
README's GPU recipe lines) and no logging or checkpointing; skips ``--warmup`` steps (allocation, cuDNN
autotuning, compilation) and times the next ``--steps``. The data are uniform noise of the experiment's image
shape, held in memory. Every setting is also run as a plain PyTorch loop on the same module and batch (the same
optimizer, clipping, LR schedule and EMA update, autocast for the ``*-mixed`` precisions): the ratio is
Lightning's per-step overhead. Prints one line per setting and the ratio to the first. Ratios within one run
are the figure to quote; absolute times on shared machines are noisy.

Arguments with ``=`` that do not start with ``-`` are Hydra overrides and may come anywhere on the line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig


class StepTimer(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of the last step (device-synchronised)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        _sync()
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compose_config(args: argparse.Namespace, overrides: list[str], precision: str, compile_net: bool,
                   channels_last: bool) -> DictConfig:
    """The experiment's config with synthetic data of the experiment's own image shape."""
    GlobalHydra.instance().clear()
    with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
        experiment = compose("train", overrides=[f"experiment={args.experiment}"] + overrides)
        shape = [f"data.image_size={experiment.data.image_size}", f"data.channels={experiment.data.channels}"]
        return compose("train", overrides=[
            f"experiment={args.experiment}", "data=synthetic", *shape, f"data.batch_size={args.batch_size}",
            f"model.compile={str(compile_net).lower()}", f"model.channels_last={str(channels_last).lower()}",
            f"trainer.precision={precision}", f"trainer.accelerator={args.accelerator}",
            f"trainer.max_steps={args.warmup + args.steps}", *overrides,
        ])


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, _partial_=True)(diffusion=instantiate(cfg.diffusion), sampler=None)
    return datamodule, module


def lightning_images_per_s(cfg: DictConfig, args: argparse.Namespace) -> tuple[float, int]:
    """(images/s over all processes, world size); under DDP every process runs this and rank 0 reports."""
    datamodule, module = build(cfg)
    timer = StepTimer(args.warmup)
    with tempfile.TemporaryDirectory() as root:
        trainer: L.Trainer = instantiate(
            cfg.trainer, default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[timer],
        )
        trainer.fit(module, datamodule=datamodule)
    return args.steps * args.batch_size * trainer.world_size / (timer.end - timer.start), trainer.world_size


def plain_step(cfg: DictConfig, accelerator: str,
               ema_update: Callable[[L.LightningModule], None] | None = None) -> Callable[[], None]:
    """One training step of the module written as a hand loop (what a user would otherwise write): the module's
    loss on one fixed batch, backward, clipping, the optimizer and LR schedule, the EMA update (``ema_update``
    replaces the module's own, e.g. to time torch's). Also used by profile_train_step.py."""
    datamodule, module = build(cfg)
    device = torch.device("cuda" if accelerator == "gpu" else accelerator)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark", False))  # as the Trainer would set it
    module.to(device)
    datamodule.setup("fit")
    batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())).to(device), 0)
    config = module.configure_optimizers()
    optimizer, scheduler = (config, None) if isinstance(config, torch.optim.Optimizer) else \
        (config["optimizer"], config["lr_scheduler"]["scheduler"])
    precision = str(cfg.trainer.precision)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype) if precision.endswith("-mixed") else nullcontext()
    if module.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    def step() -> None:
        with autocast:
            per_example, _ = module.objective(module.train_denoiser, batch)
            loss = per_example.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.net.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema_update is None:
            module.ema.update_parameters(module.net)
        else:
            ema_update(module)

    return step


def seconds_per_step(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Device-synchronised wall time per call of ``step``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - start) / steps


def plain_loop_images_per_s(cfg: DictConfig, args: argparse.Namespace) -> float:
    """The same module, batch and update as a hand loop, timed like the Lightning run."""
    return args.batch_size / seconds_per_step(plain_step(cfg, args.accelerator), args.warmup, args.steps)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options, Hydra overrides): a Hydra override is a ``key=value`` word that is not an option."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def main(argv: list[str] | None = None) -> list[dict]:
    options, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ddpm_cifar10")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="also measure each precision with torch.compile")
    parser.add_argument("--channels-last", action="store_true", help="also measure each precision in channels_last")
    parser.add_argument("--no-plain-loop", action="store_true", help="skip the plain-loop (Lightning overhead) runs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(options)
    if args.accelerator == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.experiment}: batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, on {device}"
          + (f"; overrides {' '.join(overrides)}" if overrides else ""))
    results: list[dict] = []
    variants = [(False, False)] + [(True, False)] * args.compile + [(False, True)] * args.channels_last
    for precision in args.precisions:
        for compile_net, channels_last in variants:
            cfg = compose_config(args, overrides, precision, compile_net, channels_last)
            label = precision + " + compile" * compile_net + " + channels_last" * channels_last
            images_per_s, world_size = lightning_images_per_s(cfg, args)
            row = {"setting": label, "lightning": images_per_s}
            first = results[0]["lightning"] if results else row["lightning"]
            line = f"{label:32s} {row['lightning']:10.1f} images/s   x{row['lightning'] / first:.2f}"
            if world_size > 1:
                line += f"   ({world_size} processes)"
            elif not args.no_plain_loop:
                row["plain_loop"] = plain_loop_images_per_s(cfg, args)
                overhead = row["plain_loop"] / row["lightning"]  # Lightning's time per step / the plain loop's
                line += f"   plain loop {row['plain_loop']:10.1f} images/s (Lightning/plain time x{overhead:.2f})"
            results.append(row)
            print(line, flush=True)
    return results


if __name__ == "__main__":
    main()
