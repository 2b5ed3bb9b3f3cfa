"""The pieces of the variational bound (Ho et al. 2020 eq. 5) as pure tensor functions, in nats.

    L = L_T + sum_{t>1} L_{t-1} + L_0,   L_T = KL(q(x_T|x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)),   L_0 = -log p(x_0|x_1)  (discretised Gaussian decoder).

Written by hand, as in the original code (``diffusion_utils_2.py``) and improved-diffusion
(``losses.py``): no library computes these terms; the normal CDF itself comes from ``torch.special``.
``GaussianDiffusion.vb_terms`` combines them with a network; ``diffusion_lab.metrics.likelihood`` sums them over t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG2 = math.log(2.0)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats.

    = 1/2 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) - 1).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_diff_ndtr(hi: Tensor, lo: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for hi > lo, stable in both tails.

    Reflected into the lower tail (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)), where log_ndtr is accurate, then
    log(Phi(b) - Phi(a)) = log Phi(b) + log1p(-exp(log Phi(a) - log Phi(b))).
    """
    upper = lo > 0
    b = torch.where(upper, -lo, hi)
    a = torch.where(upper, -hi, lo)
    log_b, log_a = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    # exp(-200) is ~1e-87: below that the correction is nothing, and clamping avoids slow subnormal floats.
    return log_b + torch.log1p(-torch.exp((log_a - log_b).clamp(min=-200.0)).clamp(max=1.0 - 1e-15))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, levels: int) -> Tensor:
    """log P(x) elementwise, in nats, for data quantised to ``levels`` values evenly spaced on [-1, 1].

    The decoder of Ho et al. eq. 13: the Gaussian N(mean, e^(2 log_scale)) integrated over the bin
    [x - h, x + h], h = 1 / (levels - 1) (1/255 for 8-bit images, 1/16 for the 17-level digits), with the
    edge bins reaching to -inf (x = -1) and +inf (x = 1). Computed in float64 with the exact normal CDF.
    """
    if levels < 2:
        raise ValueError(f"quantization levels must be >= 2, got {levels}")
    half = 1.0 / (levels - 1)
    x, mean, log_scale = x.double(), mean.double(), log_scale.double()
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + half)
    lower = inv_std * (x - mean - half)
    log_cdf_upper = torch.special.log_ndtr(upper)  # bin (-inf, x + h]: the lowest level
    log_sf_lower = torch.special.log_ndtr(-lower)  # bin [x - h, inf): the highest level
    log_mid = _log_diff_ndtr(upper, lower)
    return torch.where(x < -1 + half / 2, log_cdf_upper, torch.where(x > 1 - half / 2, log_sf_lower, log_mid))


def mean_over_dims(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: per-dimension values, so bits/dim after dividing by log 2."""
    return x.flatten(1).mean(1)
