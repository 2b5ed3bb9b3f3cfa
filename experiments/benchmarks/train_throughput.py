"""Training throughput (images/s, TFLOP/s, MFU) of an experiment's model on synthetic data of its shape, and
Lightning's overhead.

    python experiments/benchmarks/train_throughput.py --experiment ddpm_cifar10 --precisions bf16-mixed \
        --settings eager default default+channels_last reduce-overhead --batch-sizes 128 256 --no-plain-loop
    python experiments/benchmarks/train_throughput.py --experiment ddpm_cifar10 --precisions 32-true bf16-mixed --compile --channels-last
    python experiments/benchmarks/train_throughput.py --experiment ddpm_cifar10 trainer=bf16 data.batch_size=128
    python experiments/benchmarks/train_throughput.py --experiment digits --accelerator cpu --steps 20

Runs the real Lightning training step (loss, backward, clipping, Adam, EMA update) through ``trainer.fit`` with
the trainer built from the experiment's own ``trainer`` config group (so ``trainer=bf16``/``ddp`` here are the
README's GPU recipe lines) and no logging or checkpointing; skips ``--warmup`` steps (allocation, cuDNN
autotuning, compilation, CUDA-graph recording) and times the next ``--steps``. The data are uniform noise of the
experiment's image shape, held in memory. Every eager setting is also run as a plain PyTorch loop on the same
module and batch (the same optimizer, clipping, LR schedule and EMA update, autocast for the ``*-mixed``
precisions): the ratio is Lightning's per-step overhead. Prints one line per setting and the ratio to the first.
Ratios within one run are the figure to quote; absolute times on shared machines are noisy.

A setting (``--settings``) is ``eager`` or a ``model.compile`` mode (``default``, ``reduce-overhead``,
``max-autotune-no-cudagraphs``), optionally ``+channels_last``. MFU: the FLOPs of one training image (forward and
backward, counted by ``torch.utils.flop_counter.FlopCounterMode``: 37.3 GFLOP for the CIFAR-10 U-Net) times images/s
per device, over the device's dense peak for the precision (``sample_throughput.PEAK_TFLOPS``: H100 SXM / H200
989.4 TFLOP/s bf16; ``--peak-tflops`` to give one). ``--sync-check N``: after the timed steps, N more steps run
under :class:`diffusion_lab.callbacks.SyncCheck` (the CUDA sync debug mode on a GPU) and every host sync found is
printed. ``--compile-backend aot_eager``: compile without inductor (dry runs on a CPU; the mode is then ignored).

Arguments with ``=`` that do not start with ``-`` are Hydra overrides and may come anywhere on the line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from diffusion_lab.callbacks import SyncCheck

sys.path.insert(0, str(Path(__file__).parent))
from sample_throughput import PEAK_TFLOPS  # noqa: E402  (one table of device peaks for both benchmarks)


class StepTimer(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of step ``warmup + steps`` (device-synchronised)."""

    def __init__(self, warmup: int, steps: int | None = None) -> None:
        self.warmup, self.steps, self.start, self.end = warmup, steps, 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.steps is not None and trainer.global_step > self.warmup + self.steps:
            return  # steps after the timed ones (the sync check)
        _sync()
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compose_config(args: argparse.Namespace, overrides: list[str], precision: str, compile_net: bool | str,
                   channels_last: bool) -> DictConfig:
    """The experiment's config with synthetic data of the experiment's own image shape; ``compile_net``: the
    ``model.compile`` value (False, True or a mode)."""
    GlobalHydra.instance().clear()
    with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
        experiment = compose("train", overrides=[f"experiment={args.experiment}"] + overrides)
        shape = [f"data.image_size={experiment.data.image_size}", f"data.channels={experiment.data.channels}"]
        return compose("train", overrides=[
            f"experiment={args.experiment}", "data=synthetic", *shape, f"data.batch_size={args.batch_size}",
            f"model.compile={str(compile_net).lower() if isinstance(compile_net, bool) else compile_net}",
            f"model.channels_last={str(channels_last).lower()}",
            f"trainer.precision={precision}", f"trainer.accelerator={args.accelerator}",
            f"trainer.max_steps={args.warmup + args.steps}", *overrides,
        ])


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule]:
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model, _partial_=True)(diffusion=instantiate(cfg.diffusion), sampler=None)
    return datamodule, module


def sync_window(start: int, length: int, log_every_n_steps: int) -> tuple[int, int]:
    """``length`` consecutive steps from ``start`` on, none of them a logging step (which reads on the host)."""
    n = max(1, log_every_n_steps)
    while any((step + 1) % n == 0 for step in range(start, start + length)):
        start += 1
    return start, start + length - 1


def lightning_images_per_s(cfg: DictConfig, args: argparse.Namespace) -> tuple[float, int, dict[str, Any]]:
    """(images/s over all processes, world size, details); under DDP every process runs this and rank 0 reports.
    Details: the sync-check findings and the optimizer's fused/capturable flags."""
    datamodule, module = build(cfg)
    timer = StepTimer(args.warmup, args.steps)
    callbacks: list[L.Callback] = [timer]
    max_steps = args.warmup + args.steps
    check = None
    if args.sync_check:
        first, last = sync_window(max_steps + 1, args.sync_check, int(cfg.trainer.get("log_every_n_steps", 50)))
        check = SyncCheck(first, last, raise_on_read=False)
        callbacks.append(check)
        max_steps = last + 2
    with tempfile.TemporaryDirectory() as root:
        trainer: L.Trainer = instantiate(
            cfg.trainer, default_root_dir=root, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, max_steps=max_steps,
        )
        trainer.fit(module, datamodule=datamodule)
    defaults = trainer.optimizers[0].defaults
    details = {"fused": defaults.get("fused"), "capturable": defaults.get("capturable")}
    if check is not None:
        details |= {"sync_check_steps": [check.first, check.last], "steps_checked": check.steps_checked,
                    "host_syncs": check.reads}
    images = args.steps * int(cfg.data.batch_size) * trainer.world_size
    return images / (timer.end - timer.start), trainer.world_size, details


def train_flops_per_image(cfg: DictConfig, device: torch.device) -> float:
    """FLOPs of one training image: the module's loss forward and backward at batch 2 (FlopCounterMode counts
    matmuls, convolutions and attention, 2 per multiply-add), halved."""
    _, module = build(cfg)
    module.to(device).train()
    net = module.net
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)
    x0 = torch.rand(2, *shape, device=device) * 2 - 1
    counter = FlopCounterMode(display=False)
    with counter:
        per_example, _ = module.objective(module.train_denoiser, x0, module.condition(
            torch.zeros(2, dtype=torch.long, device=device) if module.num_classes is not None else None))
        per_example.mean().backward()
    return counter.get_total_flops() / 2


def peak_for(device_name: str, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for a training precision (TF32 for 32-true: it is allowed here)."""
    key = {"bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}.get(precision, "tf32")
    return next((peaks.get(key) for name, peaks in PEAK_TFLOPS if name in device_name), None)


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
        if module.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # as DiffusionModule.training_step does
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
    batch = int(cfg.data.batch_size)
    return batch / seconds_per_step(plain_step(cfg, args.accelerator), args.warmup, args.steps)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(options, Hydra overrides): a Hydra override is a ``key=value`` word that is not an option."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def parse_setting(name: str) -> tuple[str | None, bool]:
    """``eager`` | ``default`` (or ``compile``) | ``reduce-overhead`` | ``max-autotune-no-cudagraphs``, each
    optionally ``+channels_last`` (``channels_last`` alone: eager) -> (compile mode or None, channels_last)."""
    mode, _, layout = name.partition("+")
    if mode == "channels_last" and not layout:
        mode, layout = "eager", "channels_last"
    mode = "default" if mode == "compile" else mode
    if mode not in ("eager", *COMPILE_MODES) or layout not in ("", "channels_last"):
        raise SystemExit(f"unknown setting {name!r}: use eager or one of {', '.join(COMPILE_MODES)}, "
                         "optionally +channels_last")
    return (None if mode == "eager" else mode), layout == "channels_last"


def use_compile_backend(backend: str) -> None:
    """Compile the training net with ``backend`` instead of inductor (torch.compile takes no mode with it)."""
    import diffusion_lab.training.module as module_py

    if backend != "inductor":
        module_py.compile_net = lambda net, mode: torch.compile(net, backend=backend)


def say(text: str) -> None:
    """Print on rank 0 only (under DDP every process runs main())."""
    if rank_zero_only.rank == 0:
        print(text, flush=True)


def device_name(accelerator: str) -> str:
    return torch.cuda.get_device_name() if accelerator == "gpu" else f"CPU ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> list[dict]:
    options, overrides = split_argv(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ddpm_cifar10")
    parser.add_argument("--accelerator", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--settings", nargs="+", default=None,
                        help="eager | default | reduce-overhead | max-autotune-no-cudagraphs, each optionally "
                             "+channels_last (default: eager, plus --compile / --channels-last)")
    parser.add_argument("--compile", action="store_true", help="also measure each precision with torch.compile")
    parser.add_argument("--channels-last", action="store_true", help="also measure each precision in channels_last")
    parser.add_argument("--no-plain-loop", action="store_true", help="skip the plain-loop (Lightning overhead) runs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="per device (default: --batch-size)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sync-check", type=int, default=0, metavar="N",
                        help="after the timed steps, check N more steps for host syncs (0: no check)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak for MFU")
    parser.add_argument("--compile-backend", default="inductor", help="inductor, or e.g. aot_eager for dry runs")
    parser.add_argument("--out", default=None, help="append one JSON line per setting to this file")
    args = parser.parse_args(options)
    use_compile_backend(args.compile_backend)
    if args.accelerator == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = [parse_setting(n) for n in args.settings] if args.settings else \
        [(None, False)] + [("default", False)] * args.compile + [(None, True)] * args.channels_last
    batch_sizes = args.batch_sizes or [args.batch_size]
    device = device_name(args.accelerator)
    say(f"{args.experiment}: batch {', '.join(map(str, batch_sizes))} per device, {args.steps} timed steps after "
        f"{args.warmup}, on {device}" + (f"; overrides {' '.join(overrides)}" if overrides else ""))
    flops = None
    results: list[dict] = []
    for precision in args.precisions:
        peak = args.peak_tflops or peak_for(device, precision)
        for mode, channels_last in settings:
            for batch in batch_sizes:
                args.batch_size = batch
                cfg = compose_config(args, overrides, precision, mode or False, channels_last)
                if flops is None:  # counted eagerly (the same arithmetic in every setting)
                    eager = compose_config(args, overrides, precision, False, False)
                    flops = train_flops_per_image(eager, torch.device("cuda" if args.accelerator == "gpu" else "cpu"))
                    say(f"{flops / 1e9:.2f} GFLOP per training image (forward + backward, FlopCounterMode); "
                        f"peak {peak if peak else 'unknown'} TFLOP/s dense for {precision} on {device}")
                label = precision + (f" + compile {mode}" if mode else "") + " + channels_last" * channels_last
                images_per_s, world_size, details = lightning_images_per_s(cfg, args)
                tflops = images_per_s / world_size * flops / 1e12  # per device
                row = {"setting": label, "batch_size": batch, "world_size": world_size, "lightning": images_per_s,
                       "tflops_per_device": tflops, "mfu": tflops / peak if peak else None, "peak_tflops": peak,
                       "flops_per_image": flops, "device": device, "torch": torch.__version__, **details}
                first = results[0]["lightning"] if results else images_per_s
                mfu = f"{100 * row['mfu']:5.1f}% MFU" if peak else "  MFU n/a (no peak known)"
                line = (f"{label:44s} batch {batch:4d}  {images_per_s:10.1f} images/s  {tflops:7.3g} TFLOP/s  {mfu}"
                        f"   x{images_per_s / first:.2f}")
                if world_size > 1:
                    line += f"   ({world_size} processes)"
                elif not args.no_plain_loop and mode is None:
                    row["plain_loop"] = plain_loop_images_per_s(cfg, args)
                    overhead = row["plain_loop"] / row["lightning"]  # Lightning's time per step / the plain loop's
                    line += f"   plain loop {row['plain_loop']:10.1f} images/s (Lightning/plain time x{overhead:.2f})"
                if mode == "reduce-overhead":
                    line += f"   (Adam fused={details['fused']}, capturable={details['capturable']})"
                if args.sync_check:
                    syncs = details["host_syncs"]
                    line += (f"\n    host syncs in steps {details['sync_check_steps'][0]}-"
                             f"{details['sync_check_steps'][1]}: " + ("none" if not syncs else
                                                                      f"{len(syncs)}: " + "; ".join(syncs[:5])))
                results.append(row)
                say(line)
                if args.out and rank_zero_only.rank == 0:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    return results


if __name__ == "__main__":
    main()
