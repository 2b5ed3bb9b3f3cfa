"""Run one BPDEvaluation (val/bpd) on a tiny digits model with N CPU processes (ddp_spawn, gloo); write rank 0's value.

Used by test_likelihood_runs.py: a separate interpreter, so process groups never leak into the test session.
"""

import json
import sys
from functools import partial

import lightning as L
import torch


def main(devices: int, out: str) -> None:
    from diffusion_lab.callbacks import BPDEvaluation
    from diffusion_lab.data import DiffusionDataModule, DigitsSource
    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.nets import UNet
    from diffusion_lab.training import DiffusionModule

    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, out_channels=2, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    # lr = 0 and ema_decay = 0: the weights stay the initial ones, isolating the evaluation's sharding and gathering.
    diffusion = GaussianDiffusion(50, variance="learned_range", loss="hybrid", quantization_levels=17)
    module = DiffusionModule(net, diffusion, partial(torch.optim.Adam, lr=0.0), ema_decay=0.0)
    dm = DiffusionDataModule(DigitsSource(), name="digits", image_size=8, channels=1, batch_size=16, limit=64,
                             quantization_levels=17)
    # 7 images: an uneven split over 2 ranks exercises the padding of the gather.
    callback = BPDEvaluation(enabled=True, every_n_steps=0, num_images=7, batch_size=3, on_train_end=False)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback, Scorer(callback, out)])
    trainer.fit(module, datamodule=dm)


class Scorer(L.Callback):
    def __init__(self, evaluation, out: str) -> None:
        self.evaluation, self.out = evaluation, out

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        values = self.evaluation.run(trainer, pl_module, log=False)
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump(values, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
