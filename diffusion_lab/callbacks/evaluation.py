"""FID / IS / KID during training: every N steps (and at the end) sample with the EMA weights and score.

Under DDP every rank draws its share of the sample indices (rank, rank + world, ...), features are gathered
and put back in index order, so the numbers are the same on 1 process or N: image i depends only on
(seed, i). Metrics are logged as ``val/fid``, ``val/is``, ``val/kid`` to every logger; a ModelCheckpoint
monitoring ``val/fid`` (callbacks/eval.yaml) keeps the best-FID checkpoint, as the papers report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from diffusion_lab.callbacks.progress import SamplingClock, count_due
from diffusion_lab.metrics.evaluate import gather_in_index_order, generate_features, shard
from diffusion_lab.metrics.extractors import make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig, compute_metrics
from diffusion_lab.metrics.reference import get_reference
from diffusion_lab.samplers.base import Sampler

_log = logging.getLogger(__name__)  # (`log` is a flag of run())


class FIDEvaluation(L.Callback):
    def __init__(
        self,
        dataset_name: str,
        every_n_steps: int = 10000,
        num_samples: int = 10000,
        sampler: Sampler | None = None,
        metrics: MetricsConfig | dict | None = None,
        feature_extractor: str = "inception-v3-compat",
        inception_weights: str | None = None,
        reference_dir: str = "data/reference_stats",
        split: str = "train",
        seed: int = 0,
        batch_size: int = 256,
        on_train_end: bool = True,
    ) -> None:
        self.dataset_name, self.every_n_steps, self.num_samples = dataset_name, every_n_steps, num_samples
        self.sampler, self.seed, self.batch_size, self.at_train_end = sampler, seed, batch_size, on_train_end
        self.metrics = metrics if isinstance(metrics, MetricsConfig) else MetricsConfig(**(metrics or {}))
        self.feature_extractor, self.inception_weights = feature_extractor, inception_weights
        self.reference_dir, self.split = Path(reference_dir), split
        self.reference: dict | None = None
        self.extractor: Any = None
        self.history: list[dict[str, float]] = []
        self.clock = SamplingClock()
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before any training: missing Inception weights or a mismatched reference fail now, not after an hour.
        # fork_rng: building networks draws random initial weights; the training RNG stream must not notice.
        with torch.random.fork_rng(devices=[]):
            self._setup(trainer)

    def _setup(self, trainer: L.Trainer) -> None:
        self.extractor = make_extractor(self.feature_extractor, self.inception_weights)
        if trainer.is_global_zero:
            self.reference = get_reference(trainer.datamodule, self.dataset_name, self.split, self.feature_extractor,
                                           self.reference_dir, need_features=self.metrics.needs_reference_features,
                                           inception_weights=self.inception_weights)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            self.reference = get_reference(trainer.datamodule, self.dataset_name, self.split, self.feature_extractor,
                                           self.reference_dir, need_features=self.metrics.needs_reference_features)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module, log=False)

    def remaining_evaluations(self, trainer: L.Trainer, pl_module: L.LightningModule, last_step: int) -> int:
        """Single-image network evaluations this rank will still run after the current step up to ``last_step``."""
        runs = count_due(self.every_n_steps, (), trainer.global_step, last_step)
        if self.at_train_end and not (self.every_n_steps > 0 and last_step % self.every_n_steps == 0):
            runs += 1
        per_rank = len(shard(self.num_samples, trainer.global_rank, trainer.world_size))
        return runs * per_rank * len((self.sampler or pl_module.sampler).visited(pl_module.diffusion))

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> dict[str, float]:
        self._last_step = trainer.global_step
        sampler = self.sampler or pl_module.sampler
        rank, world = trainer.global_rank, trainer.world_size
        indices = shard(self.num_samples, rank, world)
        with self.clock.measure(len(indices) * len(sampler.visited(pl_module.diffusion))):
            features, logits, _ = generate_features(pl_module.ema_net, pl_module.diffusion, sampler, indices,
                                                    self.extractor, self.seed, self.batch_size, pl_module.device)
        if world > 1:
            features, logits = (gather_in_index_order(pl_module.all_gather, x.to(pl_module.device), self.num_samples,
                                                      world) for x in (features, logits))
        scores = compute_metrics(features, logits, self.reference, self.metrics)
        self.history.append({"step": trainer.global_step, **scores})
        names = {"fid": "val/fid", "is": "val/is", "kid": "val/kid"}
        values = {names[k]: v for k, v in scores.items() if k in names}
        if log:  # for ModelCheckpoint(monitor="val/fid") and the returned metrics; self.log is not allowed at the end
            for name, value in values.items():
                pl_module.log(name, value, sync_dist=False, rank_zero_only=False, logger=False)
        # Straight to the loggers: self.log would only reach them on steps that are multiples of log_every_n_steps.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            _log.info("step %d: %s (%d samples, %s %d steps, %.1f s)", trainer.global_step,
                      ", ".join(f"{k} {v:.4g}" for k, v in values.items()), self.num_samples, sampler.name,
                      len(sampler.visited(pl_module.diffusion)), self.clock.last)
        return scores
