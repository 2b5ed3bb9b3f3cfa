"""Run one FIDEvaluation on a tiny digits model with N CPU processes (ddp_spawn, gloo) and write its scores.

Used by test_evaluation.py: a separate interpreter, so process groups never leak into the test session.
"""

import json
import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.conftest
from tests.conftest import tiny_unet  # noqa: E402


def main(devices: int, out: str) -> None:
    from diffusion_lab.callbacks import FIDEvaluation
    from diffusion_lab.data import DiffusionDataModule, DigitsSource
    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.samplers import DDIMSampler
    from diffusion_lab.training import DiffusionModule

    torch.manual_seed(0)
    net = tiny_unet()
    # lr = 0 and ema_decay = 0: the weights stay the initial ones whatever data each rank's step sees, so the
    # comparison isolates the evaluation (sharding by index, gathering) from DDP's different effective batch.
    module = DiffusionModule(net, GaussianDiffusion(100), partial(torch.optim.Adam, lr=0.0), ema_decay=0.0)
    dm = DiffusionDataModule(DigitsSource(), name="digits", image_size=8, channels=1, batch_size=16, limit=64)
    callback = FIDEvaluation("digits", every_n_steps=0, num_samples=50, sampler=DDIMSampler(num_steps=5),
                             feature_extractor="digits-classifier", reference_dir=out + ".ref", batch_size=8,
                             on_train_end=False)
    fit_one_step_and_score(module, dm, callback, devices, out)


def fit_one_step_and_score(module, datamodule, evaluation, devices: int, out: str) -> None:
    """One training step on ``devices`` CPU processes (ddp_spawn, gloo), then ``evaluation.run`` on every rank;
    rank 0 writes the result to ``out`` as JSON. Also used by ddp_bpd_worker.py."""
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[evaluation, Scorer(evaluation, out)])
    trainer.fit(module, datamodule=datamodule)


class Scorer(L.Callback):
    """After the one training step, run the evaluation on every rank and write rank 0's scores."""

    def __init__(self, evaluation, out: str) -> None:
        self.evaluation, self.out = evaluation, out

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        scores = self.evaluation.run(trainer, pl_module, log=False)
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump(scores, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
