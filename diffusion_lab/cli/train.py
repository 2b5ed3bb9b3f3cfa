"""``diffusion-lab-train``: compose the config, build data/model/trainer, fit, return the swept metric."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.config import validate_config
from diffusion_lab.training.checkpoints import resolve_ckpt_path

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train one run described by ``cfg``; returns the final logged metrics as floats."""
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
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
    sampler = instantiate(cfg.sampler)
    sampler.visited(diffusion)  # a bad num_steps/spacing fails now, not at the first sample grid
    # Objects go in through a partial: instantiate() would turn a dataclass kwarg into a DictConfig.
    module = instantiate(cfg.model, _partial_=True)(diffusion=diffusion, sampler=sampler)
    module.run_config = resolved
    datamodule.check_model(module.net)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.task_name, output_dir)
    if ckpt_path:
        log.info("Resuming from %s", ckpt_path)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        for logger in loggers:
            logger.finalize("success")
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    log.info("Run folder: %s", output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
