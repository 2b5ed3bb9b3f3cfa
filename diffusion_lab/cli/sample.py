"""``diffusion-lab-sample``: draw images from a checkpoint with any sampler; write PNGs, a grid and a record."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import Progress

from diffusion_lab.cli.common import configure_threads, require_positive, writable_dir
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
    samplers = build_samplers(cfg)
    model = load_model(cfg.ckpt, cfg.use_ema, device)
    check_samplers(samplers, model.diffusion)
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
            images = sampler.sample(net, diffusion, (len(indices), *shape), seed=cfg.seed, indices=indices, device=device)
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
        "num_images": cfg.num_images, "seed": cfg.seed, "device": str(device), "seconds": round(seconds, 3),
        "images_per_second": round(cfg.num_images / seconds, 3),
    }
    (out / "sampling.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("%d images with %s (%d NFE) in %.1f s -> %s", cfg.num_images, sampler.name, nfe, seconds, out)
    return out


@main_guard
@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    sample(cfg)


if __name__ == "__main__":
    main()
