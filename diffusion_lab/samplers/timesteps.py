"""The one place that decides which timesteps a sampler visits.

Every sampler reads its current and previous timestep from the list returned here; none derives them by
arithmetic. The list is strictly decreasing, starts near T - 1 and ends at 0 for every spacing except
``leading``/``uniform`` (which, as in the DDIM paper, never visits t = T - 1 when S < T).

Rounding can make a spacing repeat a timestep (``quadratic`` repeats t = 0 for S = 50 and 100, exactly as the
DDIM code does). A repeated timestep is a step from t to t: an identity map for DDIM (eta = 0) that costs a
network evaluation. The list keeps each timestep once, so it may hold fewer than S entries; its length is the
true number of network evaluations, and that is what results report.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
from torch import Tensor

from diffusion_lab.errors import ConfigError

# The one list of spacings: samplers annotate their field with it and the config check reads it from there.
Spacing = Literal["uniform", "leading", "quadratic", "trailing", "linspace", "logsnr", "karras"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "uniform", alphas_cumprod: Tensor | None = None
) -> list[int]:
    """Visited timesteps, in sampling order (descending), for ``num_steps`` of a ``num_train_timesteps`` process.

    - ``uniform`` / ``leading``: range(0, T, T // S) (DDIM's uniform skip; diffusers' "leading" with offset 0).
    - ``quadratic``: int((linspace(0, sqrt(0.8 T), S))^2), truncated as in the DDIM code (its CIFAR-10 skip).
    - ``trailing``: round(arange(T, 0, -T / S)) - 1 (diffusers; always visits T - 1).
    - ``linspace``: round(linspace(0, T - 1, S)) (diffusers).
    - ``logsnr``: the timesteps nearest to S points uniform in log-SNR between t = T - 1 and t = 0 (Lu et al.'s
      DPM-Solver "logSNR" skip); needs the schedule's ``alphas_cumprod``.
    - ``karras``: the timesteps nearest (in log sigma) to Karras et al. 2022's S noise levels
      sigma_i = (sigma_max^(1/7) + i / (S - 1) (sigma_min^(1/7) - sigma_max^(1/7)))^7 (EDM eq. 5, rho = 7), with
      sigma_t = sqrt((1 - abar_t) / abar_t) and sigma_min, sigma_max those of t = 0 and t = T - 1; needs
      ``alphas_cumprod``. diffusers (``use_karras_sigmas=True``) keeps the exact sigmas and evaluates the net at
      fractional timesteps; a discrete-time model is trained at integer t only, so this list rounds to them.
    """
    T, S = int(num_train_timesteps), int(num_steps)
    if spacing not in SPACINGS:
        raise ConfigError(f"spacing={spacing!r} is not allowed; allowed values: {', '.join(SPACINGS)}")
    if S < 1:
        raise ConfigError(f"num_steps={S}: a sampler needs at least one step; use num_steps between 1 and {T}")
    if S > T:
        raise ConfigError(f"num_steps={S} exceeds the {T} timesteps the model was trained with; use num_steps <= {T}")
    if spacing in ("uniform", "leading"):
        steps = np.arange(0, T, T // S)[:S]
    elif spacing == "quadratic":
        steps = (np.linspace(0, math.sqrt(0.8 * T), S) ** 2).astype(np.int64)
    elif spacing == "trailing":
        steps = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
    elif spacing == "linspace":
        steps = np.round(np.linspace(0, T - 1, S)).astype(np.int64)
    else:  # logsnr, karras: nearest timesteps to targets in log-SNR (= -2 log sigma)
        if alphas_cumprod is None or len(alphas_cumprod) != T:
            raise ValueError(f"spacing={spacing!r} needs the schedule's alphas_cumprod (length T)")
        a = alphas_cumprod.double().clamp(1e-12, 1 - 1e-12)
        half_log_snr = (0.5 * (a.log() - (1 - a).log())).cpu().numpy()  # = -log sigma_t
        if spacing == "logsnr":
            targets = np.linspace(half_log_snr[-1], half_log_snr[0], S)
        else:
            targets = -np.log(karras_sigmas(S, np.exp(-half_log_snr[0]), np.exp(-half_log_snr[-1])))
        steps = np.abs(half_log_snr[None, :] - targets[:, None]).argmin(axis=1)
    unique = sorted({int(s) for s in steps}, reverse=True)
    if unique[-1] < 0 or unique[0] > T - 1:
        raise ValueError(f"spacing={spacing!r} produced timesteps outside [0, {T - 1}]: {unique}")
    return unique


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: ``num_steps`` noise levels from sigma_max down to sigma_min, denser near sigma_min."""
    ramp = np.linspace(0, 1, num_steps) if num_steps > 1 else np.zeros(1)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho
