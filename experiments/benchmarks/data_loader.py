"""Loader throughput (images/s): the in-memory tensor path vs the per-image PIL path, on a CIFAR-shaped folder.

    python experiments/benchmarks/data_loader.py                   # 5000 random 32x32 RGB PNGs, batch 128
    python experiments/benchmarks/data_loader.py --images 50000 --workers 0 2

Builds a folder of ``--images`` 32x32 PNG files (CIFAR-10's form; random pixels, so PNG cannot compress them
away) in a temporary directory, then times whole epochs of training batches in [-1, 1] with random flips, as the
training step receives them: the per-image path (``data.in_memory=false``: open, decode, convert, flip and scale
each image in the loader, with ``--workers`` processes) against the in-memory path (``data.in_memory=true``: one
gather per batch from the uint8 tensor, then ``finish_batch`` - scale and flip the whole batch - here on the
CPU, on the training device in a real run). Rounds interleave the paths; the figure is the median epoch.
The one-time decode of the in-memory path (``setup``) is reported separately. Threads: ``--threads`` (1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion_lab.data import DiffusionDataModule, FolderSource


def make_folder(root: Path, n: int, size: int = 32, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i:06d}.png")


def epoch_images_per_s(dm: DiffusionDataModule) -> float:
    loader = dm.train_dataloader()
    count, start = 0, time.perf_counter()
    for batch in loader:
        batch = dm.on_after_batch_transfer(batch, 0)  # in memory: scale + flip the batch; per image: a no-op
        count += len(batch)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="loader processes for the PIL path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_folder(root, args.images)
        common = dict(image_size=32, channels=3, batch_size=args.batch_size, hflip=True, center_crop=True)
        paths: dict[str, DiffusionDataModule] = {}
        for workers in args.workers:
            paths[f"per-image PIL, {workers} workers"] = DiffusionDataModule(
                FolderSource(str(root)), num_workers=workers, in_memory=False, **common)
        in_memory = DiffusionDataModule(FolderSource(str(root)), num_workers=max(args.workers), in_memory=True,
                                        **common)
        start = time.perf_counter()
        in_memory.setup("fit")
        setup_s = time.perf_counter() - start
        paths["in-memory uint8 tensor"] = in_memory
        for dm in paths.values():
            dm.setup("fit")
            epoch_images_per_s(dm)  # warm-up (worker start-up, file cache)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, dm in paths.items():
                times[name].append(epoch_images_per_s(dm))
    print(f"{args.images} 32x32 RGB PNGs, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
          f"median of {args.rounds} epochs; in-memory set-up (decode once): {setup_s:.1f} s "
          f"({in_memory.train_set.images.numel() / 2**20:.1f} MiB uint8)")
    medians = {name: statistics.median(v) for name, v in times.items()}
    fastest_pil = max(v for k, v in medians.items() if k.startswith("per-image"))
    for name, ips in medians.items():
        print(f"  {name:28s} {ips:12.0f} images/s")
    print(f"in-memory / per-image PIL (best): x{medians['in-memory uint8 tensor'] / fastest_pil:.0f}")


if __name__ == "__main__":
    main()
