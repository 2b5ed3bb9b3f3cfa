"""The noise-schedule config a pipeline carries, in diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` vocabulary.

It turns into this project's :class:`GaussianDiffusion` (the maths) and reads/writes
``scheduler/scheduler_config.json`` so that folders load in diffusers and back.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import CheckpointNotFoundError
from diffusion_lab.pipelines.diffusers_format import FormatError, read_json, refuse_unknown_fields

# diffusers scheduler fields this project does not model, with the only value it samples like diffusers with.
# Anything else is refused by SchedulerConfig.load rather than silently dropped.
UNMODELLED: dict[str, tuple[Any, str]] = {
    "steps_offset": (0, "the visited timesteps are never shifted"),
    "set_alpha_to_one": (True, "DDIM's last step always goes to alpha-bar = 1"),
    "clip_sample_range": (1.0, "clip_sample clips x0 to [-1, 1]"),
    "thresholding": (False, "dynamic thresholding (Imagen) is not implemented"),
}
# diffusers fields that only matter with thresholding=True (refused above), so any value samples alike.
THRESHOLDING_ONLY = ("dynamic_thresholding_ratio", "sample_max_value")
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing values

# diffusers name <-> this project's name
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# learned_range: a UNet2DModel with out_channels = 2C (Improved DDPM's learned variances), both ways.
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


@dataclasses.dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_large"  # DDPM sampling; Ho et al.'s CIFAR-10 setting (diffusers defaults to small)
    clip_sample: bool = True
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        for key, value, allowed in (("beta_schedule", self.beta_schedule, tuple(BETA_SCHEDULES)),
                                    ("prediction_type", self.prediction_type, tuple(PREDICTION_TYPES)),
                                    ("variance_type", self.variance_type, VARIANCE_TYPES),
                                    ("timestep_spacing", self.timestep_spacing, SPACINGS)):
            if value not in allowed:
                raise FormatError(f"scheduler {key}={value!r} is not supported; use one of: {', '.join(allowed)}")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise FormatError(f"scheduler num_train_timesteps={self.num_train_timesteps!r} must be an int >= 1 "
                              "(the T the net was trained with, e.g. 1000)")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise FormatError(f"scheduler beta_start={self.beta_start}, beta_end={self.beta_end}: need "
                              "0 < beta_start <= beta_end < 1 (DDPM: 0.0001 and 0.02)")

    def diffusion(self) -> GaussianDiffusion:
        return GaussianDiffusion(
            num_timesteps=self.num_train_timesteps,
            schedule=BETA_SCHEDULES[self.beta_schedule],
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            zero_terminal_snr=self.rescale_betas_zero_snr,
            prediction_type=PREDICTION_TYPES[self.prediction_type],
            variance=self.variance_type,
        )

    @classmethod
    def from_diffusion(cls, diffusion: GaussianDiffusion, **kwargs: Any) -> "SchedulerConfig":
        schedule = {v: k for k, v in BETA_SCHEDULES.items()}[diffusion.schedule]
        prediction = {v: k for k, v in PREDICTION_TYPES.items()}[diffusion.prediction_type]
        if diffusion.learned_variance:  # the net's 2C outputs only make sense with the learned variance
            kwargs["variance_type"] = "learned_range"
        return cls(num_train_timesteps=diffusion.num_timesteps, beta_schedule=schedule,
                   beta_start=diffusion.beta_start, beta_end=diffusion.beta_end,
                   prediction_type=prediction, rescale_betas_zero_snr=diffusion.zero_terminal_snr, **kwargs)

    def save(self, folder: str | Path, class_name: str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"_class_name": class_name, "_diffusers_version": "0.30.0", **dataclasses.asdict(self),
                   "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
        (folder / "scheduler_config.json").write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "SchedulerConfig":
        """Read ``scheduler_config.json``: every field is used, or must hold the value this project samples like
        diffusers with, or is refused by name (unknown fields too), so nothing that changes sampling is dropped."""
        path = Path(folder) / "scheduler_config.json"
        if not path.is_file():
            raise CheckpointNotFoundError(
                f"{path} not found: a pipeline folder needs scheduler/scheduler_config.json (a DDPMScheduler or "
                "DDIMScheduler config); write the folder with save_pretrained, or copy that file from the folder "
                "the net was saved in")
        raw = read_json(path)
        fields = {f.name for f in dataclasses.fields(cls)}
        refuse_unknown_fields(raw, fields | set(UNMODELLED) | set(THRESHOLDING_ONLY) | {"trained_betas"}, str(path),
                              "DDPMScheduler / DDIMScheduler")
        name = raw.get("_class_name", "DDPMScheduler")
        if name not in SCHEDULER_CLASSES:
            raise FormatError(f"{path}: _class_name={name!r} is not supported: diffusers would sample with {name}, "
                              f"this project only with {' or '.join(SCHEDULER_CLASSES)}; save the pipeline with one "
                              "of those")
        if raw.get("trained_betas") is not None:
            raise FormatError(f"{path}: trained_betas (explicit beta arrays) are not supported; give "
                              "beta_schedule/beta_start/beta_end and \"trained_betas\": null")
        for key, (default, why) in UNMODELLED.items():
            value = raw.get(key, default)
            if key == "clip_sample_range" and not raw.get("clip_sample", True):
                continue  # the range only matters when clipping
            if value != default:
                raise FormatError(
                    f"{path}: {key}={json.dumps(value)} is not supported ({why}); this folder would sample "
                    f"differently here than in diffusers. Use a folder with {key}={json.dumps(default)}, or edit "
                    "scheduler_config.json if that is what you want"
                )
        values = {k: v for k, v in raw.items() if k in fields}
        if name == "DDPMScheduler":  # a missing field means diffusers' default, which differs from this class's
            values.setdefault("variance_type", "fixed_small")
        try:
            return cls(**values)
        except FormatError as error:
            raise FormatError(f"{path}: {error}") from error
