"""FID / IS / KID during training: every N steps (and at the end) sample with the EMA weights and score.

Under DDP every rank draws its share of the sample indices (rank, rank + world, ...), features are gathered
and put back in index order, so the numbers are the same on 1 process or N: image i depends only on
(seed, i). A class-conditional model draws image i of class i mod K at ``guidance_scale`` (1: the conditional
model alone) and, where the feature extractor classifies the data's classes (the digits classifier), also logs
``val/class_accuracy``. Metrics are logged as ``val/fid``, ``val/is``, ``val/kid`` to every logger; a ModelCheckpoint
monitoring ``val/fid`` (callbacks/eval.yaml) keeps the best-FID checkpoint, as the papers report.

One sampler and one extractor can hide a regression that another sees (issue 17: a clipped DPM-Solver++ FID
stayed level while the unclipped DDIM FID doubled). ``extra_samplers`` ({name: sampler}) score the same
seeds with other samplers, logged as ``val/fid_<name>``; ``extra_extractors`` score every sampler's images with
other feature extractors too, logged as ``val/fid_<extractor>`` and ``val/fid_<name>_<extractor>`` (FID only;
IS stays the main extractor's). ``gate`` ({score name: upper bound}) is checked on the last evaluation of a run
of ``gate_recipe`` ({num_samples, max_steps}: what the bands were measured for); see
:mod:`diffusion_lab.metrics.gate`.

Each evaluation also sends ``time/elapsed_min`` to the loggers: the wall minutes since this process began
training, this evaluation included. With a constant learning rate after warm-up, a run's FID at step k and this
value are what a run of k steps would score and cost, so one sweep run traces its whole FID-against-wall-time
curve (diffusion-lab-report).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from time import perf_counter
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, SCMode

from diffusion_lab.callbacks.schedule import ScheduledCallback, check_count
from diffusion_lab.metrics.evaluate import gather_in_index_order, generate_features, shard
from diffusion_lab.diffusion.denoiser import check_guidance_scale, net_contract, uniform_labels
from diffusion_lab.metrics.extractors import CLASSIFIES, EXTRACTORS, LAYERS, make_extractor
from diffusion_lab.metrics.fidelity import MetricsConfig, class_accuracy, compute_metrics, extract
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.gate import check_gate
from diffusion_lab.metrics.reference import get_reference
from diffusion_lab.samplers.base import Sampler
from diffusion_lab.utils.images import to_uint8

_log = logging.getLogger(__name__)  # (`log` is a flag of run())


def fid_name(sampler: str = "", extractor: str = "") -> str:
    """The logged name of an FID: ``val/fid`` (the main sampler and extractor), ``val/fid_<sampler>``,
    ``val/fid_<extractor>`` or ``val/fid_<sampler>_<extractor>`` (an extra sampler and/or extractor)."""
    return "_".join(["val/fid", *(p for p in (sampler, extractor) if p)])


class FIDEvaluation(ScheduledCallback):
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
        extra_samplers: dict[str, Sampler] | None = None,
        extra_extractors: list[str] | tuple[str, ...] = (),
        gate: dict[str, float] | None = None,
        gate_recipe: dict[str, int] | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        super().__init__("callbacks.fid", every_n_steps, (), on_train_end)
        # a class-conditional model draws image i of class i mod K at this scale (Condition.for_indices)
        try:
            self.guidance_scale = check_guidance_scale(guidance_scale)
        except ConfigError as error:
            raise error.at("callbacks.fid") from None
        check_count("callbacks.fid.num_samples", num_samples, 1, 10000)
        check_count("callbacks.fid.batch_size", batch_size, 1, 256)
        bad = [n for n in (extra_samplers or {}) if not str(n).replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise ConfigError(f"callbacks.fid.extra_samplers: names must be letters, digits, - or _ (they name the "
                              f"logged metric val/fid_<name>), got {bad}")
        unknown = [e for e in [feature_extractor, *extra_extractors] if e not in EXTRACTORS]
        if unknown:
            raise ConfigError(f"callbacks.fid: unknown feature extractor(s) {unknown}; "
                              f"allowed: {', '.join(EXTRACTORS)}")
        if isinstance(extra_samplers, DictConfig):  # Hydra keeps the instantiated (dataclass) samplers as structured
            extra_samplers = OmegaConf.to_container(extra_samplers, structured_config_mode=SCMode.INSTANTIATE)
        self.extra_samplers = {str(k): v for k, v in (extra_samplers or {}).items()}
        wrong = {k: type(v).__name__ for k, v in self.extra_samplers.items() if not isinstance(v, Sampler)}
        if wrong:
            raise ConfigError(f"callbacks.fid.extra_samplers: {wrong} are not samplers; give each a sampler config "
                              f"with _target_ (e.g. diffusion_lab.samplers.DDIMSampler)")
        self.extra_extractors = [str(e) for e in extra_extractors if str(e) != feature_extractor]
        self.dataset_name, self.num_samples = dataset_name, num_samples
        self.sampler, self.seed, self.batch_size = sampler, seed, batch_size
        self.metrics = metrics if isinstance(metrics, MetricsConfig) else MetricsConfig(**(metrics or {}))
        if self.metrics.isc and len(LAYERS[feature_extractor]) < 2:
            raise ConfigError(f"callbacks.fid.feature_extractor={feature_extractor} has no logits for IS; use "
                              f"digits-classifier (and {feature_extractor} in extra_extractors), or metrics.isc=false")
        self.gate = dict(gate or {})
        # FID depends on the sample count and the bands on the run length: check only the recipe they hold for
        self.gate_recipe = {str(k): int(v) for k, v in (gate_recipe or {}).items()}
        unknown = sorted(set(self.gate_recipe) - {"num_samples", "max_steps"})
        if unknown:
            raise ConfigError(f"callbacks.fid.gate_recipe: unknown key(s) {unknown}; allowed: num_samples, max_steps")
        self.gate_failures: list[str] = []
        self.values: dict[str, float] = {}  # the last evaluation's logged scores
        missing = sorted(set(self.gate) - set(self.logged_names()))
        if missing:  # found at start-up, not after training
            raise ConfigError(f"callbacks.fid.gate bounds {missing}, but this callback logs only "
                              f"{', '.join(self.logged_names())}; fix the gate's keys or add the sampler/extractor")
        check_gate({}, self.gate)  # a bound that is not a number fails now
        self.feature_extractor, self.inception_weights = feature_extractor, inception_weights
        self.reference_dir, self.split = Path(reference_dir), split
        self.reference: dict | None = None
        self.extractor: Any = None
        self.extras: dict[str, tuple[Any, dict]] = {}  # extra extractor name -> (extractor, reference)
        self.history: list[dict[str, float]] = []
        self.train_start: float | None = None  # perf_counter() when this process began training

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.train_start = perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.guidance_scale != 1 and net_contract(pl_module.net)["num_classes"] is None:
            raise ConfigError(f"callbacks.fid.guidance_scale={self.guidance_scale:g} needs a class-conditional model "
                              "(model.net.num_classes); this one is unconditional: set callbacks.fid.guidance_scale=1")
        # Before any training: missing Inception weights or a mismatched reference fail now, not after an hour.
        # fork_rng: building networks draws random initial weights; the training RNG stream must not notice.
        with torch.random.fork_rng(devices=[]):
            self._setup(trainer)

    def _setup(self, trainer: L.Trainer) -> None:
        self.extractor = make_extractor(self.feature_extractor, self.inception_weights)
        self.reference = self._reference(trainer, self.feature_extractor)
        for name in self.extra_extractors:
            self.extras[name] = (make_extractor(name, self.inception_weights), self._reference(trainer, name))

    def _reference(self, trainer: L.Trainer, extractor: str) -> dict:
        """Rank 0 builds (or reads) the cached statistics first; the others read them after the barrier."""
        reference = None
        if trainer.is_global_zero:
            reference = get_reference(trainer.datamodule, self.dataset_name, self.split, extractor, self.reference_dir,
                                      need_features=self.metrics.needs_reference_features,
                                      inception_weights=self.inception_weights)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            reference = get_reference(trainer.datamodule, self.dataset_name, self.split, extractor, self.reference_dir,
                                      need_features=self.metrics.needs_reference_features)
        return reference

    def fire(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool) -> None:
        self.run(trainer, pl_module, log=not at_end)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.is_global_zero and self.gate:
            run = {"num_samples": self.num_samples, "max_steps": trainer.max_steps}
            other = {k: (v, run[k]) for k, v in self.gate_recipe.items() if run[k] != v}
            if other:
                _log.info("quality gate not checked: its bands hold for %s; this run has %s",
                          ", ".join(f"{k}={want}" for k, (want, _) in other.items()),
                          ", ".join(f"{k}={have}" for k, (_, have) in other.items()))
            elif not self.history or self.history[-1]["step"] != trainer.global_step:  # bands: the final model
                _log.info("quality gate not checked: no evaluation at the last step (%d); set "
                          "callbacks.fid.on_train_end=true", trainer.global_step)
            else:
                self.check_gate()

    def logged_names(self) -> list[str]:
        """The scores one evaluation logs: val/fid, val/is, val/kid (as enabled) and the extra FIDs."""
        names = [n for n, on in (("val/fid", self.metrics.fid), ("val/is", self.metrics.isc),
                                 ("val/kid", self.metrics.kid)) if on]
        if self.metrics.fid:
            names += [fid_name(label, e) for label in ["", *self.extra_samplers] for e in ["", *self.extra_extractors]
                      if label or e]
        return names

    def evaluations_per_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """This rank's share of the images, each drawn by the main and every extra sampler."""
        per_rank = len(shard(self.num_samples, trainer.global_rank, trainer.world_size))
        samplers = [self.sampler or pl_module.sampler, *self.extra_samplers.values()]
        branches = 2 if self.guidance_scale != 1 else 1  # guided: both branches in one batched forward
        return branches * per_rank * sum(len(s.visited(pl_module.diffusion)) for s in samplers)

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, sampler: Sampler) -> dict[str, dict]:
        """{extractor name: scores} of this rank's share of the images drawn by ``sampler``, gathered."""
        world = trainer.world_size
        indices = shard(self.num_samples, trainer.global_rank, world)
        keep = len(indices) if self.extras else 0
        with self.clock.measure(len(indices) * len(sampler.visited(pl_module.diffusion))):
            features, logits, images = generate_features(pl_module.ema_net, pl_module.diffusion, sampler, indices,
                                                         self.extractor, self.seed, self.batch_size, pl_module.device,
                                                         keep_images=keep, guidance_scale=self.guidance_scale)
        sets = {self.feature_extractor: (features, logits, self.reference)}
        for name, (extractor, reference) in self.extras.items():
            sets[name] = (*extract(extractor, [to_uint8(images)], pl_module.device), reference)
        out = {}
        for name, (features, logits, reference) in sets.items():
            if world > 1:
                features, logits = (gather_in_index_order(pl_module.all_gather, x.to(pl_module.device),
                                                          self.num_samples, world) for x in (features, logits))
            # the extra extractors give FID (and KID/precision/recall when asked for); IS is the main one's
            config = self.metrics if name == self.feature_extractor else dataclasses.replace(self.metrics, isc=False)
            out[name] = compute_metrics(features, logits, reference, config)
        num_classes = net_contract(pl_module.net)["num_classes"]
        if num_classes is not None and CLASSIFIES.get(self.feature_extractor) == self.dataset_name:
            logits = sets[self.feature_extractor][1]
            if world > 1:
                logits = gather_in_index_order(pl_module.all_gather, logits.to(pl_module.device), self.num_samples,
                                               world)
            out[self.feature_extractor]["class_accuracy"] = class_accuracy(
                logits, uniform_labels(range(self.num_samples), num_classes))
        return out

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True) -> dict[str, float]:
        """One evaluation now (the schedule calls it; so can a script); ``log=False`` where self.log is not allowed."""
        sampler = self.sampler or pl_module.sampler
        start = perf_counter()
        names = {"fid": "val/fid", "is": "val/is", "kid": "val/kid", "class_accuracy": "val/class_accuracy"}
        values: dict[str, float] = {}
        scores: dict[str, float] = {}
        for label, each in [("", sampler), *self.extra_samplers.items()]:
            for extractor, result in self._score(trainer, pl_module, each).items():
                extra = "" if extractor == self.feature_extractor else extractor
                if not (label or extra):
                    scores = result
                    values.update({names[k]: v for k, v in result.items() if k in names})
                elif "fid" in result:
                    values[fid_name(label, extra)] = result["fid"]
        self.history.append({"step": trainer.global_step, **scores,
                             **{k[len("val/"):]: v for k, v in values.items() if k.startswith("val/fid_")}})
        if log:  # for ModelCheckpoint(monitor="val/fid") and the returned metrics; self.log is not allowed at the end
            for name, value in values.items():
                pl_module.log(name, value, sync_dist=False, rank_zero_only=False, logger=False)
        # Straight to the loggers: self.log would only reach them on steps that are multiples of log_every_n_steps.
        if trainer.is_global_zero:
            timed = dict(values)
            if self.train_start is not None:  # not for a script's call outside fit
                timed["time/elapsed_min"] = (perf_counter() - self.train_start) / 60
            for logger in trainer.loggers:
                logger.log_metrics(timed, step=trainer.global_step)
            drawn = " + ".join(f"{s.name} {len(s.visited(pl_module.diffusion))} steps"
                               for s in [sampler, *self.extra_samplers.values()])
            _log.info("step %d: %s (%d samples, %s, %.1f s)", trainer.global_step,
                      ", ".join(f"{k} {v:.4g}" for k, v in values.items()), self.num_samples, drawn,
                      perf_counter() - start)
        self.values = values
        return scores

    def check_gate(self) -> list[str]:
        """The last evaluation's failures against ``gate`` (logged as an error: the run and its checkpoints stay)."""
        self.gate_failures = check_gate(self.values, self.gate) if self.gate else []
        for failure in self.gate_failures:
            _log.error("quality gate failed: %s (callbacks.fid.gate)", failure)
        if self.gate and not self.gate_failures:
            _log.info("quality gate passed: %s", ", ".join(f"{k} <= {v:g}" for k, v in self.gate.items()))
        return self.gate_failures
