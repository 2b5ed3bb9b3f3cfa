"""This project's U-Net vs diffusers' UNet2DModel at the same config, side by side on this machine.

    python experiments/benchmarks/unet_vs_diffusers.py                      # digits (batch 128) and CIFAR-10 (batch 8)
    python experiments/benchmarks/unet_vs_diffusers.py --variants eager channels_last compile --rounds 5

The diffusers network is built from this project's own exported config (``unet_to_diffusers_config``) and given
the same weights (``state_dict_to_diffusers``), so both compute the same function with the same parameter count
(checked). Each round times, for every network, one full training step (forward, MSE loss, backward, Adam step)
and one no-grad forward (one sampling step). Adam is this project's configured fused kernel for ours
(``--ours-adam default`` for torch's default, as on the diffusers side). Rounds interleave the networks so that load from other processes
on a shared machine hits all of them alike, and the figure is the median over rounds. ``--threads`` (default 1)
fixes torch's intra-op threads for the same reason. Variants of ours (``--variants``) are the speed levers:

    eager          the network as configured (the default ``model.net`` settings)
    channels_last  inputs and weights in NHWC memory format (``model.channels_last=true``)
    compile        ``torch.compile`` (inductor; C++ codegen on CPU, Triton on GPU), as ``model.compile=true``
    compile_cl     both

Prints the per-config times and the ours/diffusers ratios last, and writes a JSON record (machine, CPU, threads,
torch and diffusers versions, every median and ratio) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from diffusion_lab.nets import UNet
from diffusion_lab.pipelines.diffusers_format import state_dict_to_diffusers, unet_to_diffusers_config

# The two configs of conf/model/unet_digits.yaml and unet_cifar10.yaml (dropout 0.1 in both).
CONFIGS = {
    "digits": (dict(image_size=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2, 2), attn_resolutions=(4,)), 128),
    "cifar10": (dict(), 8),  # UNetConfig's defaults are the CIFAR-10 model (35.7M parameters)
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class Contender:
    """One network with its optimiser and the two timed closures."""

    name: str
    net: torch.nn.Module
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    channels_last: bool = False
    fused_adam: bool = False
    train_times: list[float] = field(default_factory=list)
    forward_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        # fused=None: torch's default (a per-parameter for-loop on CPU, foreach on CUDA), what a hand-written
        # diffusers loop gets; this project's configs ask for the fused kernel (conf/model/unet_cifar10.yaml).
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-4, fused=self.fused_adam or None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def train_step(self, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> None:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.call(self.prepare(x), t), eps)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.net.eval()
        self.call(self.prepare(x), t)


def ours(cfg: dict, variant: str, fused_adam: bool = True) -> Contender:
    torch.manual_seed(0)
    net = UNet(**cfg)
    channels_last = variant in ("channels_last", "compile_cl")
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    call = torch.compile(net) if variant.startswith("compile") else net
    return Contender(f"ours[{variant}]", net, call, channels_last=channels_last, fused_adam=fused_adam)


def theirs(reference: UNet) -> Contender:
    import diffusers

    net = diffusers.UNet2DModel(**{k: v for k, v in unet_to_diffusers_config(reference.config).items()
                                   if not k.startswith("_")})
    net.load_state_dict(state_dict_to_diffusers(reference))
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (reference, net))
    if n_ours != n_theirs:
        raise RuntimeError(f"parameter counts differ: ours {n_ours:,}, diffusers {n_theirs:,}")
    return Contender("diffusers", net, lambda x, t: net(x, t).sample)


def bench(name: str, cfg: dict, batch: int, variants: list[str], rounds: int, warmup: int, fused_adam: bool) -> dict:
    mine = [ours(cfg, v, fused_adam) for v in variants]
    # Same starting weights for everyone (the zero-initialised output layers would otherwise make gradients tiny).
    with torch.no_grad():
        for p in mine[0].net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    for c in mine[1:]:
        c.net.load_state_dict(mine[0].net.state_dict())
    contenders = [theirs(mine[0].net)] + mine
    shape = (batch, cfg.get("in_channels", 3), cfg.get("image_size", 32), cfg.get("image_size", 32))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    n = sum(p.numel() for p in contenders[0].net.parameters())
    with torch.no_grad():  # the same function: one forward of every contender agrees with diffusers'
        expected = contenders[0].net.eval()(x, t).sample
        for c in contenders[1:]:
            torch.testing.assert_close(c.net.eval()(c.prepare(x), t), expected, atol=1e-4, rtol=1e-4)
    print(f"\n{name}: {n:,} parameters, batch {batch}, {rounds} rounds after {warmup} warm-up", flush=True)
    for _ in range(warmup):  # allocation, oneDNN primitive caches, compilation
        for c in contenders:
            c.train_step(x, t, eps)
            c.forward(x, t)
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]  # alternate the order too
        for c in order:
            start = time.perf_counter()
            c.train_step(x, t, eps)
            c.train_times.append(time.perf_counter() - start)
        for c in order:
            start = time.perf_counter()
            c.forward(x, t)
            c.forward_times.append(time.perf_counter() - start)
    record = {"parameters": n, "batch_size": batch, "rounds": rounds, "networks": {}}
    base_train = statistics.median(contenders[0].train_times)
    base_forward = statistics.median(contenders[0].forward_times)
    for c in contenders:
        train, forward = statistics.median(c.train_times), statistics.median(c.forward_times)
        record["networks"][c.name] = {
            "train_step_s": train, "forward_s": forward,
            "train_ratio_to_diffusers": train / base_train, "forward_ratio_to_diffusers": forward / base_forward,
            "train_images_per_s": batch / train,
        }
        print(f"  {c.name:22s} train step {train * 1e3:9.1f} ms   forward {forward * 1e3:8.1f} ms", flush=True)
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--variants", nargs="+", default=["eager"],
                        choices=["eager", "channels_last", "compile", "compile_cl"])
    parser.add_argument("--ours-adam", choices=["fused", "default"], default="fused",
                        help="ours: the project's fused Adam (default) or torch's default Adam, as diffusers' side")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on shared CPUs)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cifar10-batch", type=int, default=CONFIGS["cifar10"][1])
    parser.add_argument("--digits-batch", type=int, default=CONFIGS["digits"][1])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("unet_vs_diffusers.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers

    record = {
        "machine": platform.node(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "variants": args.variants,
        "ours_adam": args.ours_adam, "diffusers_adam": "torch default (fused=None)", "configs": {},
    }
    print(f"{record['cpu']}, {record['threads']} thread(s), torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; Adam: ours {args.ours_adam}, diffusers torch default")
    batches = {"digits": args.digits_batch, "cifar10": args.cifar10_batch}
    for name in args.configs:
        record["configs"][name] = bench(name, CONFIGS[name][0], batches[name], args.variants, args.rounds, args.warmup,
                                       args.ours_adam == "fused")
    print("\nours / diffusers (median time ratio; < 1 means ours is faster):")
    for name, rec in record["configs"].items():
        for label, net in rec["networks"].items():
            if label != "diffusers":
                print(f"  {name:8s} {label:22s} train step {net['train_ratio_to_diffusers']:.3f}   "
                      f"forward {net['forward_ratio_to_diffusers']:.3f}")
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"record: {args.out}")
    return record


if __name__ == "__main__":
    main()
