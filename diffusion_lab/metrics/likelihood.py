"""Negative log-likelihood bound in bits/dim: every term of L = L_T + sum_t L_{t-1} + L_0 for each image.

The DDPM paper's NLL column (Ho et al. 2020, Table 1/2; the original code's ``calc_bpd_loop``): for each image
x_0 and each t = T-1, ..., 0, draw x_t ~ q(x_t | x_0), evaluate the network once and score
``GaussianDiffusion.vb_terms`` (a KL for t > 0, the discretised decoder at t = 0); add the prior term L_T.
The noise of image i comes from a generator seeded by (seed, i) alone and is drawn in the same order of t, so
an image's terms do not depend on the batch it is in, nor on how many processes share the images.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Condition, as_denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import UserError
from diffusion_lab.samplers.noise import Noise


class LikelihoodConfigError(UserError, ValueError):
    """A bad ``nll`` setting (split, image count, variance); the message names the key and the fix."""


@dataclasses.dataclass
class BPDResult:
    """Per-image bits/dim: ``total`` = ``prior`` + ``terms.sum(1)``; ``terms[:, t]`` is L_{t-1} (0-based t,
    ``terms[:, 0]`` the decoder NLL L_0); ``indices`` are the images' positions in the data set."""

    indices: Tensor  # (N,) long
    total: Tensor  # (N,) float64
    prior: Tensor  # (N,)
    terms: Tensor  # (N, T)

    def summary(self) -> dict[str, Any]:
        n = len(self.total)
        std_err = self.total.std().item() / math.sqrt(n) if n > 1 else float("nan")
        return {"bpd": self.total.mean().item(), "bpd_std_err": std_err, "prior_bpd": self.prior.mean().item(),
                "decoder_bpd": self.terms[:, 0].mean().item(), "kl_bpd": self.terms[:, 1:].sum(1).mean().item(),
                "num_images": n}


@torch.no_grad()
def bits_per_dim(
    net: Callable[[Tensor, Tensor], Tensor],
    diffusion: GaussianDiffusion,
    images: Tensor,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    quantization_levels: int | None = None,
    variance: str | None = None,
    clip_denoised: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable[[int], Any] | None = None,
    cond: Condition | None = None,
) -> BPDResult:
    """The full bound for each of ``images`` (in [-1, 1], (N, C, H, W)), with T network calls per image.

    ``indices[k]`` (default k) is image k's position in its data set: it seeds that image's noise.
    ``quantization_levels`` sets the decoder's bin width (default: the diffusion's); ``variance`` scores a
    fixed-variance model with fixed_large or fixed_small (default: the diffusion's own); ``clip_denoised`` clips
    the predicted x_0 to [-1, 1] as the original ``calc_bpd_loop`` and improved-diffusion's evaluation do.
    """
    indices = list(range(len(images))) if indices is None else list(indices)
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    denoiser = as_denoiser(net, diffusion)  # the network is read only through the denoiser
    net, diffusion = denoiser.net, denoiser.diffusion
    T = diffusion.num_timesteps
    was_training = getattr(net, "training", False)
    if isinstance(net, nn.Module):
        net.eval()
    totals, priors, all_terms = [], [], []
    try:
        for first in range(0, len(images), batch_size):
            x0 = images[first:first + batch_size].to(device=device, dtype=torch.float32)
            chunk = indices[first:first + batch_size]
            noise = Noise(x0.shape, x0.device, seed=seed, indices=chunk)
            terms = torch.zeros(len(x0), T, dtype=torch.float64)
            for t in reversed(range(T)):  # the order of noise draws: part of the (seed, index) contract
                t_batch = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
                x_t = diffusion.q_sample(x0, t_batch, noise())
                prediction = denoiser(x_t, t_batch, cond[first:first + batch_size] if cond is not None else None)
                terms[:, t] = diffusion.vb_terms(prediction, x0, x_t, t_batch, clip_x0=clip_denoised,
                                                 variance=variance, quantization_levels=quantization_levels).cpu()
            prior = diffusion.prior_bpd(x0.double()).cpu()
            priors.append(prior)
            all_terms.append(terms)
            totals.append(prior + terms.sum(1))
            if progress is not None:
                progress(len(x0))
    finally:
        if isinstance(net, nn.Module):
            net.train(was_training)
    return BPDResult(torch.tensor(indices, dtype=torch.long), torch.cat(totals), torch.cat(priors),
                     torch.cat(all_terms))


def dataset_images(datamodule: Any, split: str, num_images: int | None) -> Tensor:
    """The first ``num_images`` images (all with None) of the data set's ``split``, in [-1, 1], unflipped.

    A source with splits (``data.source.split``, e.g. a Hugging Face set) is switched to ``split``; a source
    without (the embedded digits) has only ``train``.
    """
    source = datamodule.source
    if split != getattr(source, "split", "train"):
        if not hasattr(source, "split"):
            raise LikelihoodConfigError(f"nll.split={split!r}: data {datamodule.name!r} has only a train split; "
                                        "use nll.split=train")
        datamodule = copy.copy(datamodule)
        datamodule.source = copy.copy(source)
        datamodule.source.split = split
        datamodule.train_set = None
    datamodule.setup("fit")
    data = datamodule.train_set
    n = len(data) if num_images is None else int(num_images)
    if n < 1 or n > len(data):
        raise LikelihoodConfigError(f"nll.num_images={num_images} but the {split} split has {len(data)} images; "
                                    f"choose 1..{len(data)} (or null for all)")
    transform = copy.copy(datamodule.transform)
    transform.hflip = False  # the bound of the data set itself, not of random mirror images
    base = data.base  # the unfinished items (per-image and in-memory data sets alike): finished once, here
    return torch.stack([transform(base[i]) for i in range(n)])


def plot_terms(terms_mean: Sequence[float], path: str | Path, title: str = "") -> Path:
    """The bound's per-timestep terms L_{t-1} (bits/dim, log scale) against t, as Ho et al.'s rate plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(range(len(terms_mean)), terms_mean, lw=1)
    ax.set_xlabel("t (0 = decoder term L_0)")
    ax.set_ylabel("L_{t-1} (bits/dim)")
    ax.set_title(title or "variational bound terms per timestep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_nll_config(cfg: Any, diffusion: GaussianDiffusion, datamodule_cfg: Any) -> None:
    """The ``nll:`` block's values, at start-up (the cell runs after the grid): a bad one is a LikelihoodConfigError."""
    from diffusion_lab.diffusion.gaussian import VARIANCES

    variance = cfg.get("variance")
    if variance is not None and variance not in VARIANCES:
        raise LikelihoodConfigError(f"nll.variance={variance!r} is not allowed; allowed values: null (the model's "
                                    f"own), {', '.join(VARIANCES)}")
    if variance == "learned_range" and diffusion.variance != "learned_range":
        raise LikelihoodConfigError("nll.variance=learned_range needs a learned-variance model; this one has "
                                    f"diffusion.variance={diffusion.variance}: use nll.variance=null")
    for key in ("num_images", "batch_size", "quantization_levels"):
        value, low = cfg.get(key), 2 if key == "quantization_levels" else 1
        if (value is not None or key == "batch_size") and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < low):
            raise LikelihoodConfigError(f"nll.{key}={value!r}: needs a whole number >= {low}"
                                        f"{' (or null)' if key != 'batch_size' else ''}")
    source = datamodule_cfg.get("source") or {}
    if cfg.get("split", "train") != "train" and "split" not in source:
        raise LikelihoodConfigError(f"nll.split={cfg.split!r}: data {datamodule_cfg.get('name')!r} has only a train "
                                    "split; use nll.split=train")


def nll_cell(net: nn.Module, diffusion: GaussianDiffusion, datamodule: Any, cfg: Any, out: str | Path,
             device: torch.device | str = "cpu", progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """The ``nll`` cell of an evaluation report (``diffusion-lab-eval``'s ``nll:`` block): the bound over
    ``cfg.num_images`` images of ``cfg.split``, its parts, the mean term per t, and ``<out>/nll_terms.png``."""
    levels = cfg.get("quantization_levels") or getattr(datamodule, "quantization_levels", None)
    levels = int(levels or diffusion.quantization_levels)
    images = dataset_images(datamodule, cfg.split, cfg.num_images)
    result = bits_per_dim(net, diffusion, images, seed=cfg.seed, batch_size=cfg.batch_size,
                          quantization_levels=levels, variance=cfg.get("variance"),
                          clip_denoised=cfg.clip_denoised, device=device, progress=progress)
    terms_mean = result.terms.mean(0).tolist()
    variance = cfg.get("variance") or diffusion.variance
    plot = plot_terms(terms_mean, Path(out) / "nll_terms.png",
                      title=f"bound terms, {result.summary()['bpd']:.3f} bits/dim ({variance}, {cfg.split})")
    return {**result.summary(), "split": cfg.split, "seed": cfg.seed, "quantization_levels": levels,
            "variance": variance, "clip_denoised": bool(cfg.clip_denoised), "num_timesteps": diffusion.num_timesteps,
            "terms_per_t": terms_mean, "plot": plot.name}


def append_markdown(cell: dict[str, Any], path: str | Path) -> None:
    """Add the ``nll`` cell to an evaluation's report.md as a short section."""
    path = Path(path)
    text = (f"\n## NLL bound (bits/dim)\n\n| split | images | bits/dim | +- s.e. | L_T (prior) | L_0 (decoder) | "
            f"sum L_1..L_(T-1) | variance | levels |\n|---|---|---|---|---|---|---|---|---|\n"
            f"| {cell['split']} | {cell['num_images']} | {cell['bpd']:.4f} | {cell['bpd_std_err']:.4f} | "
            f"{cell['prior_bpd']:.2e} | {cell['decoder_bpd']:.4f} | {cell['kl_bpd']:.4f} | {cell['variance']} | "
            f"{cell['quantization_levels']} |\n\nTerms against t: {cell['plot']}\n")
    with open(path, "a") as f:
        f.write(text)
