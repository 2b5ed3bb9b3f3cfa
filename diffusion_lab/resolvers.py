"""OmegaConf resolvers the configs use. Registered when ``diffusion_lab.conf`` is imported, which Hydra does
whenever it composes these configs (``pkg://diffusion_lab.conf``), so they exist in every entry point and test."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


def run_group(task_name: str) -> str:
    """``${run_group:${task_name}}``: the task name, plus the sweep folder's name inside a multirun, so the runs
    of one sweep share a W&B group."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"{task_name}/{Path(hydra_cfg.sweep.dir).name}"
    return task_name


def run_name(task_name: str) -> str:
    """``${run_name:${task_name}}``: <task>/<run folder name>, or <task>/<sweep folder>/<job number> in a multirun."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"{run_group(task_name)}/{hydra_cfg.job.num}"
        if hydra_cfg.runtime.output_dir:
            return f"{task_name}/{Path(hydra_cfg.runtime.output_dir).name}"
    return task_name


def net_out_channels(data_channels: int, variance: str) -> int:
    """``${net_out_channels:${data.channels},${diffusion.variance}}``: C, or 2C for a learned variance (the mean
    part and v of Improved DDPM eq. 15), from the denoiser's one function."""
    from diffusion_lab.diffusion.denoiser import net_output_channels

    return net_output_channels(data_channels, variance)


def distill_max_steps(start_steps: int, end_steps: int, steps_per_round: int, reparam_steps: int = 0) -> int:
    """``${distill_max_steps:${model.start_steps},${model.end_steps},${model.steps_per_round},${model.reparam_steps}}``:
    the training steps of a progressive distillation (every round, and the reparameterisation)."""
    from diffusion_lab.training.distill import max_steps

    return max_steps(start_steps, end_steps, steps_per_round, reparam_steps)


def samplers() -> str:
    """``${samplers:}``: the registered samplers (conf/sampler/*.yaml), for the help texts."""
    from diffusion_lab.samplers.registry import registered

    return ", ".join(registered())


for _name, _resolver in (("run_group", run_group), ("run_name", run_name), ("net_out_channels", net_out_channels),
                         ("distill_max_steps", distill_max_steps), ("samplers", samplers)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
