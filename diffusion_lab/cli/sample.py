"""``diffusion-lab-sample``: draw images from a checkpoint with any sampler; write PNGs, a grid and a record."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.progress import Progress

from diffusion_lab.utils.images import save_grid, to_uint8

log = logging.getLogger(__name__)


def load_model(ckpt: str | Path, use_ema: bool = True, device: str = "cpu"):
    """(net, diffusion) from a training checkpoint or a diffusers-layout folder."""
    path = Path(ckpt)
    if path.is_dir() and (path / "model_index.json").is_file():
        from diffusion_lab.pipelines import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path).to(device)
        return pipe.unet, pipe.diffusion
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(ckpt)!r} is neither a checkpoint file nor a pipeline folder")
    from diffusion_lab.training.checkpoints import load_module

    module = load_module(path, map_location=device)
    return (module.ema_net if use_ema else module.net).eval(), module.diffusion


def sample(cfg: DictConfig) -> Path:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    net, diffusion = load_model(cfg.ckpt, cfg.use_ema, device)
    sampler = instantiate(cfg.sampler)
    nfe = len(sampler.visited(diffusion))
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "samples" / f"{sampler.name}_{nfe}"
    (out / "images").mkdir(parents=True, exist_ok=True)
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
        "ckpt": str(cfg.ckpt), "use_ema": cfg.use_ema, "sampler": sampler.config(), "nfe": nfe,
        "num_images": cfg.num_images, "seed": cfg.seed, "device": str(device), "seconds": round(seconds, 3),
        "images_per_second": round(cfg.num_images / seconds, 3),
    }
    (out / "sampling.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("%d images with %s (%d NFE) in %.1f s -> %s", cfg.num_images, sampler.name, nfe, seconds, out)
    return out


@hydra.main(version_base="1.3", config_path="pkg://diffusion_lab.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    OmegaConf.resolve(cfg)
    sample(cfg)


if __name__ == "__main__":
    main()
