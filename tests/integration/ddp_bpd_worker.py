"""Run one BPDEvaluation (val/bpd) on a tiny digits model with N CPU processes (ddp_spawn, gloo); write rank 0's value.

Used by test_likelihood_runs.py: a separate interpreter, so process groups never leak into the test session.
"""

import sys
from functools import partial

import torch
from ddp_fid_worker import fit_one_step_and_score  # the same harness (this folder is on sys.path)

from tests.conftest import tiny_unet  # importable once ddp_fid_worker has put the repository root on sys.path


def main(devices: int, out: str) -> None:
    from diffusion_lab.callbacks import BPDEvaluation
    from diffusion_lab.data import DiffusionDataModule, DigitsSource
    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.training import DiffusionModule

    torch.manual_seed(0)
    net = tiny_unet(out_channels=2)
    # lr = 0 and ema_decay = 0: the weights stay the initial ones, isolating the evaluation's sharding and gathering.
    diffusion = GaussianDiffusion(50, variance="learned_range", loss="hybrid", quantization_levels=17)
    module = DiffusionModule(net, diffusion, partial(torch.optim.Adam, lr=0.0), ema_decay=0.0)
    dm = DiffusionDataModule(DigitsSource(), name="digits", image_size=8, channels=1, batch_size=16, limit=64,
                             quantization_levels=17)
    # 7 images: an uneven split over 2 ranks exercises the padding of the gather.
    callback = BPDEvaluation(enabled=True, every_n_steps=0, num_images=7, batch_size=3, on_train_end=False)
    fit_one_step_and_score(module, dm, callback, devices, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
