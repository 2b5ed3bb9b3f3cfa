"""The default run's training speed at 1 and 2 CPU threads, on a quiet machine and beside another CPU job.

    python experiments/benchmarks/threads.py                 # threads 1 and 2, quiet and busy
    python experiments/benchmarks/threads.py --threads 1 2 4 --steps 100

Each setting is a fresh process of train_throughput.py (the real Lightning step of experiment=digits: loss,
backward, clipping, Adam, EMA) with OMP_NUM_THREADS set. "busy" starts one other CPU-bound process (a pure-Python
spin loop, like a second job or a notebook kernel at work) for the duration. Prints steps/s (batch 128) per
setting. More intra-op threads than free cores make OpenMP threads wait on each other; the README's
Troubleshooting section quotes the figures. Run it with nothing else running (check `uptime`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("train_throughput.py")
SPIN = "while True: pass"


def steps_per_s(threads: int, busy: bool, steps: int, warmup: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        out = subprocess.run([sys.executable, str(SCRIPT), "--experiment", "digits", "--accelerator", "cpu",
                              "--precisions", "32-true", "--no-plain-loop", "--steps", str(steps),
                              "--warmup", str(warmup)], env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if spinner is not None:
            spinner.kill()
    images = float(re.search(r"([\d.]+) images/s", out).group(1))
    return images / 128


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"experiment=digits training steps/s (batch 128) on {os.cpu_count()} CPUs, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'threads':>8} {'quiet':>8} {'busy':>8}")
    for threads in args.threads:
        quiet = steps_per_s(threads, False, args.steps, args.warmup)
        busy = steps_per_s(threads, True, args.steps, args.warmup)
        print(f"{threads:>8} {quiet:8.2f} {busy:8.2f}", flush=True)


if __name__ == "__main__":
    main()
