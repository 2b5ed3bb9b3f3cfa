"""``diffusion-lab-sample``: draw images from a checkpoint with any sampler; write PNGs, a grid and a record."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from rich.progress import Progress

from diffusion_lab.cli.common import configure_threads, require_positive, writable_dir
from diffusion_lab.diffusion.denoiser import Condition, check_guidance_scale, net_contract
from diffusion_lab.config import build_samplers, check_samplers, validate_config
from diffusion_lab.errors import ConfigError
from diffusion_lab.cli.guard import main_guard
from diffusion_lab.loading import load_model, sampling_net
from diffusion_lab.utils.images import save_grid, to_uint8

log = logging.getLogger(__name__)


def sample(cfg: DictConfig) -> Path:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else str(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: this machine has no CUDA GPU that torch can use; use device=cpu or auto")
    log.info(configure_threads())
    # every input before the checkpoint is read, then the sampler against the model, before any sampling
    validate_config(cfg)
    require_positive("num_images", cfg.num_images)
    require_positive("batch_size", cfg.batch_size)
    labels = parse_class_labels(cfg.get("class_labels"), cfg.get("guidance_scale", 1.0))
    per_label = cfg.get("images_per_label", 1)
    require_positive("images_per_label", per_label)
    samplers = build_samplers(cfg)
    model = load_model(cfg.ckpt, cfg.use_ema, device)
    if (model.config or {}).get("distillation") and model.sampler is not None and not sampler_chosen():
        # a distilled student is trained for its own N-step DDIM; the default DDPM-1000 would not sample it
        samplers["sampler"] = model.sampler
        log.info("%s is a distilled student: sampling with its own %s (choose another with sampler=...)", cfg.ckpt,
                 model.sampler.label() + f", {model.sampler.num_steps} steps")
    check_samplers(samplers, model.diffusion)
    cond = class_condition(labels, cfg.get("guidance_scale", 1.0), model.net, cfg.num_images, per_label)
    net, diffusion, sampler = sampling_net(model.net, cfg.precision, cfg.compile), model.diffusion, samplers["sampler"]
    nfe = len(sampler.visited(diffusion))
    out = Path(cfg.out) if cfg.out else model.path.resolve().parent.parent / "samples" / f"{sampler.name}_{nfe}"
    writable_dir(out / "images", key="out")
    shape = (net.config.in_channels, net.config.image_size, net.config.image_size)

    chunks, start = [], time.perf_counter()
    with Progress() as progress:
        task = progress.add_task(f"{sampler.name}, {nfe} steps", total=cfg.num_images)
        for first in range(0, cfg.num_images, cfg.batch_size):
            indices = list(range(first, min(first + cfg.batch_size, cfg.num_images)))
            images = sampler.sample(net, diffusion, (len(indices), *shape), seed=cfg.seed, indices=indices, device=device,
                                    cond=None if cond is None else cond[indices[0]:indices[-1] + 1])
            chunks.append(images.cpu())
            for i, image in zip(indices, to_uint8(images.cpu())):
                array = image.permute(1, 2, 0).numpy()
                Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(out / "images" / f"{i:06d}.png")
            progress.advance(task, len(indices))
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)
    save_grid(images, out / "grid.png", nrow=cfg.nrow)
    record = {
        "ckpt": str(cfg.ckpt), "sha256": model.sha256, "use_ema": cfg.use_ema, "precision": str(cfg.precision),
        "compile": cfg.compile, "sampler": sampler.config(), "nfe": nfe,
        "class_labels": labels, "images_per_label": per_label if labels else None,
        "guidance_scale": float(cfg.get("guidance_scale", 1.0)) if labels else None,
        "num_images": cfg.num_images, "seed": cfg.seed, "device": str(device), "seconds": round(seconds, 3),
        "images_per_second": round(cfg.num_images / seconds, 3),
    }
    (out / "sampling.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("%d images with %s (%d NFE) in %.1f s -> %s", cfg.num_images, sampler.name, nfe, seconds, out)
    return out


def sampler_chosen() -> bool:
    """Whether the command line chose the sampler (``sampler=...`` or ``sampler.<key>=...``); True outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True
    keys = (str(o).lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task)
    return any(key == "sampler" or key.startswith("sampler.") for key in keys)


def parse_class_labels(value: Any, guidance_scale: Any) -> list[int] | None:
    """``class_labels`` (null, an int or a list of ints >= 0) and ``guidance_scale`` checked before any loading."""
    guidance_scale = check_guidance_scale(guidance_scale)
    if value is None:
        if guidance_scale != 1:
            raise ConfigError(f"guidance_scale={guidance_scale:g} needs class_labels=[...] to guide towards, e.g. "
                              "class_labels=[0,1,2,3,4,5,6,7,8,9]")
        return None
    labels = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not labels or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in labels):
        raise ConfigError(f"class_labels={value!r}: needs class indices >= 0, e.g. class_labels=[3] or "
                          "class_labels=[0,1,2]")
    return [int(v) for v in labels]


def class_condition(labels: list[int] | None, guidance_scale: float, net: Any, num_images: int,
                    images_per_label: int = 1) -> Condition | None:
    """The per-image condition (image i: ``labels[(i // images_per_label) % len(labels)]``), checked against the
    model's classes."""
    if labels is None:
        return None
    num_classes = net_contract(net)["num_classes"]
    if num_classes is None:
        raise ConfigError("class_labels were given, but this model is unconditional (trained with "
                          "model.net.num_classes=null); sample without class_labels")
    if max(labels) >= num_classes:
        raise ConfigError(f"class_labels={labels}: this model has classes 0 to {num_classes - 1}")
    per_image = torch.tensor([labels[(i // images_per_label) % len(labels)] for i in range(num_images)],
                             dtype=torch.long)
    return Condition(per_image, float(guidance_scale))


@main_guard
@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    sample(cfg)


if __name__ == "__main__":
    main()
