"""``diffusion-lab-train``: compose the config, build data/model/trainer, fit, return the swept metric."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.config import build_samplers, check_samplers, validate_config
from diffusion_lab.cli.common import configure_threads
from diffusion_lab.cli.guard import main_guard
from diffusion_lab.metrics.gate import QualityGateError
from diffusion_lab.training.checkpoint_io import AtomicCheckpointIO, checkpoint_health, remove_stale_temp_files
from diffusion_lab.training.module import NonFiniteLossError
from diffusion_lab.training.resume import (FinalCheckpoint, ResumeLearningRate, check_resume_compatible, finished,
                                           nonfinite_advice, remove_if_bookkeeping, resolve_resume)
from diffusion_lab.training.run_status import RunStatus

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one run described by ``cfg``; returns the final logged metrics as floats.

    ``<run folder>/status.json`` records running / completed / failed (with the error) and the wall time. Resuming
    a finished run (its checkpoint at ``trainer.max_steps`` or beyond) trains nothing, logs so and returns ``{}``;
    the run folder Hydra made for it is removed when it holds nothing but bookkeeping.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    status = RunStatus(output_dir, _task_overrides(cfg)) if rank_zero_only.rank == 0 else None
    threads = configure_threads()
    if status:
        status.start()
        log.info("Run folder: %s", output_dir.resolve())
        log.info("Config: %s (resolved in config.yaml)", _config_summary(cfg))
        log.info(threads)
    try:
        metrics = _train(cfg, output_dir, status)
    except BaseException as error:
        if status:
            status.fail(error)
        raise
    if metrics is None:  # a finished run: nothing was trained
        if status and remove_if_bookkeeping(output_dir):
            log.info("Removed the new run folder %s (nothing was trained)", output_dir)
        return {}
    if status:
        status.finish(metrics)
    return metrics


def _task_overrides(cfg: DictConfig) -> list[str]:
    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if overrides is None and HydraConfig.initialized():
        overrides = HydraConfig.get().overrides.task
    return [str(o) for o in overrides or []]


def _config_summary(cfg: DictConfig) -> str:
    """The chosen config groups and the command-line overrides: ``experiment=digits data=digits ...; overrides: -``."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is None and HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    groups = " ".join(f"{k}={v}" for k, v in (choices or {}).items() if not k.startswith("hydra") and v is not None)
    return f"{groups}; overrides: {' '.join(_task_overrides(cfg)) or '-'}"


def _train(cfg: DictConfig, output_dir: Path, status: RunStatus | None = None) -> dict[str, float] | None:
    validate_config(cfg)
    # Resolve first so that a bad interpolation fails now; this is the config the run folder keeps.
    # (Tests compose with the hydra node included; it is Hydra's own business and not part of the run config.)
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    resolved = OmegaConf.to_container(run_cfg, resolve=True, throw_on_missing=True)
    OmegaConf.save(OmegaConf.create(resolved), output_dir / "config.yaml")

    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("matmul_precision") and torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.matmul_precision)

    datamodule = instantiate(cfg.data)
    diffusion = instantiate(cfg.diffusion)
    # every sampler of the config (the root one, the callbacks' own), against this process: a bad num_steps,
    # spacing or variance fails now, not at the first sample grid or after training
    check_samplers(build_samplers(cfg), diffusion)
    sampler = instantiate(cfg.sampler)
    # Objects go in through a partial: instantiate() would turn a dataclass kwarg into a DictConfig.
    module = instantiate(cfg.model, _partial_=True)(diffusion=diffusion, sampler=sampler)
    module.run_config = resolved
    datamodule.check_model(module.net)

    resume = resolve_resume(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, output_dir)
    ckpt_path, start_health = None, None
    if resume:
        ckpt_path, checkpoint = str(resume[0]), resume[1]
        step, max_steps = int(checkpoint["global_step"]), cfg.trainer.get("max_steps")
        if finished(step, max_steps):
            log.info("The run is finished: %s is at step %d, trainer.max_steps=%s; nothing to train (raise "
                     "trainer.max_steps to train on)", ckpt_path, step, max_steps)
            return None
        start_health = checkpoint_health(checkpoint)
    callbacks = _instantiate_callbacks(cfg)
    if resume:
        callbacks += _resume_checks(ckpt_path, checkpoint, module, resolved)
        del checkpoint, resume  # Lightning reads the file again; do not hold a second copy while training
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    # AtomicCheckpointIO: every checkpoint is written to a temp file beside it, fsync'ed, then renamed over it.
    # FinalCheckpoint first: last.ckpt at the final step is written before any callback's end-of-training work.
    checkpoint_io = AtomicCheckpointIO()
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[FinalCheckpoint()] + callbacks, logger=loggers or False,
                                     plugins=[checkpoint_io])
    for logger in loggers:  # the resolved config: W&B's run config, TensorBoard's hparams, the CSV's hparams.yaml
        logger.log_hyperparams(resolved)
    if status:
        status.training_started()

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as error:  # the advice names the checkpoint from before the blow-up
        start = (ckpt_path, start_health or module.start_health)
        lr = (resolved.get("model") or {}).get("optimizer", {}).get("lr")
        advice = nonfinite_advice(start, checkpoint_io.saved, None if lr is None else float(lr))
        raise NonFiniteLossError(f"{error.diagnosis} {advice}", error.diagnosis) from None
    finally:
        for logger in loggers:
            logger.finalize("success")
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    log.info("Run folder: %s", output_dir)
    failures = [failure for callback in callbacks for failure in getattr(callback, "gate_failures", [])]
    if failures and not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        # after the final checkpoint and the loggers: the run is kept, but the command fails (CI sees it); in a
        # sweep a trial outside the band is a result, not an error (the callback has logged it)
        raise QualityGateError(f"quality gate failed ({'; '.join(failures)}); the run is kept in {output_dir}. "
                               "The bands are callbacks.fid.gate (the default run's, and the seeds behind them: "
                               "experiments/digits/regression/README.md)")
    return metrics


def _instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The ``callbacks`` group; with ``callbacks.fid=null`` a checkpoint that monitors a val/ metric is left out too.
    (Their samplers were checked against the process at start-up: config.build_samplers / check_samplers.)"""
    configs = {name: c for name, c in (cfg.get("callbacks") or {}).items() if c is not None}
    if "fid" not in configs:
        for name in [n for n, c in configs.items() if str(c.get("monitor") or "").startswith("val/")]:
            log.info("callbacks.%s is off: it monitors %s, which only callbacks.fid logs", name, configs[name].monitor)
            del configs[name]
    return [instantiate(c) for c in configs.values()]


def _resume_checks(ckpt_path: Path, checkpoint: dict, module: L.LightningModule, resolved: dict) -> list[L.Callback]:
    """Before any training: a checkpoint of this model config; the learning rate the user asked for."""
    check_resume_compatible(checkpoint, module, resolved, ckpt_path)
    remove_stale_temp_files(Path(ckpt_path).parent)
    old = ((checkpoint.get("diffusion_lab") or {}).get("config") or {}).get("model", {}).get("optimizer", {}).get("lr")
    new = (resolved.get("model") or {}).get("optimizer", {}).get("lr")
    if new is not None and (old is None or float(old) != float(new)):
        return [ResumeLearningRate(new, None if old is None else float(old))]
    return []


def compose_config(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The config ``diffusion-lab-train <overrides>`` would run, for notebooks and scripts: ``train(cfg)`` runs it.

    Its run folder is ``output_dir`` (default: runs/<task>/<date>_<time>, as on the command line).
    """
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_module("diffusion_lab.conf", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir) if output_dir is not None else cfg.hydra.run.dir
    HydraConfig.instance().set_config(cfg)
    return cfg


@main_guard  # above hydra.main: also reports Hydra's composition errors (mistyped keys, YAML syntax) in one line
@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    logging.captureWarnings(True)  # Python warnings reach the console and train.log through logging
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:  # a sweeper would record a failed trial with a puzzling message; say what is missing
        message = (f"optimized_metric={name!r} was not logged by this run (logged: {', '.join(sorted(metrics))}). "
                   "val/* metrics need callbacks=eval with callbacks.fid.every_n_steps dividing trainer.max_steps.")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise KeyError(message)
        log.warning(message)
        return None
    return metrics[name]


if __name__ == "__main__":
    main()
