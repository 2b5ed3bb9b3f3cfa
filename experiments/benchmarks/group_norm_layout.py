"""GroupNorm + SiLU + 3x3 convolution, forward and backward, in NCHW and channels-last, with torch's GroupNorm
kernel and with the U-Net's layout-free one (``diffusion_lab.nets.unet.group_norm_any_layout``).

    python experiments/benchmarks/group_norm_layout.py                      # CIFAR-10 U-Net shapes, batch 128, bf16
    python experiments/benchmarks/group_norm_layout.py --batch 2 --shapes 64x8 --iters 2 --device cpu   # a dry run

torch's CUDA GroupNorm works on NCHW only: a channels-last input is copied to NCHW and the result, NCHW, is
copied back by the next convolution (channels-last weights). This times the block as the eager U-Net runs it
(autocast bf16: the norm in float32, the convolution in bf16) so that the cost of those copies, and whether the
layout-free norm removes it, is measured rather than assumed. Prints milliseconds per forward+backward for each
(layout, norm) and the largest difference between the two norms' outputs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from diffusion_lab.nets.unet import group_norm_any_layout


def block(x: torch.Tensor, weight: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, layout_free: bool):
    norm = group_norm_any_layout if layout_free else F.group_norm
    return F.conv2d(F.silu(norm(x, 32, norm_w, norm_b, 1e-6)), weight, padding=1)


def time_block(x, weight, norm_w, norm_b, layout_free: bool, iters: int, device: torch.device,
               dtype: torch.dtype | None) -> tuple[float, torch.Tensor]:
    def run():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = block(x, weight, norm_w, norm_b, layout_free)
        out.float().sum().backward()
        return out

    for _ in range(2):
        out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, out.detach().float()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shapes", nargs="+", default=["128x32", "256x16", "256x8", "512x16"],
                        help="CxS: C channels at SxS (the CIFAR-10 U-Net's norms: 128x32 ... 512x16 after a skip)")
    parser.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "32"])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16-mixed" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GroupNorm(32) + SiLU + conv3x3, forward+backward, batch {args.batch}, {args.precision}, on {name}")
    rows = []
    for shape in args.shapes:
        channels, size = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        x0 = torch.randn(args.batch, channels, size, size, generator=g).to(device)
        weight0 = (torch.randn(channels, channels, 3, 3, generator=g) * 0.02).to(device)
        norm_w = (1 + 0.1 * torch.randn(channels, generator=g)).to(device).requires_grad_()
        norm_b = (0.1 * torch.randn(channels, generator=g)).to(device).requires_grad_()
        times, outs = {}, {}
        for layout in ("NCHW", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = x0.contiguous(memory_format=fmt).requires_grad_()
            weight = weight0.contiguous(memory_format=fmt).requires_grad_()
            for layout_free in (False, True):
                key = (layout, "layout-free" if layout_free else "torch")
                times[key], outs[key] = time_block(x, weight, norm_w, norm_b, layout_free, args.iters, device, dtype)
        diff = max((outs[k] - outs[("NCHW", "torch")]).abs().max().item() for k in outs)
        base = times[("NCHW", "torch")]
        cells = "   ".join(f"{layout} {norm} {1e3 * t:7.3f} ms (x{t / base:.2f})" for (layout, norm), t in times.items())
        print(f"{shape:8s} {cells}   max |diff| {diff:.2e}", flush=True)
        rows.append({"shape": shape, "ms": {f"{k[0]} {k[1]}": 1e3 * t for k, t in times.items()}, "max_diff": diff})
    return rows


if __name__ == "__main__":
    main()
