"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models").

Multistep solver of the diffusion ODE in data-prediction form: a predictor UniP-p followed after each step by the
corrector UniC-p, which reuses the network evaluation at the predicted state, so it raises the order by one at no
extra NFE. The B(h) ("bh1", "bh2") coefficients follow the paper's code and diffusers' UniPCMultistepScheduler,
with which tests/unit/test_unipc.py checks it step by step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.base import NoiseFn, Sampler
from diffusion_lab.samplers.timesteps import Spacing

ORDERS = (2, 3)
VARIANTS = ("bh1", "bh2")


@dataclasses.dataclass(frozen=True)
class UniPCSampler(Sampler):
    """UniPC-p with data prediction (the paper's choice for guided and pixel-space models).

    Symbols: alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t), lambda_t = log(alpha_t / sigma_t); a step
    goes from s_0 = t_{i-1} to t = t_i with h = lambda_t - lambda_{s_0} > 0. D_k is the model's x0 prediction at the
    k-th previous visited timestep s_k, r_k = (lambda_{s_k} - lambda_{s_0}) / h < 0 and D1_k = (D_k - D_0) / r_k.
    With z = -h, phi_1(z) = (e^z - 1) / z, phi_{n+1}(z) = (phi_n(z) - 1/n!) / z:

    x_t = (sigma_t / sigma_{s_0}) x_{s_0} - alpha_t (e^z - 1) D_0 - alpha_t B(h) sum_k rho_k D1_k,

    B(h) = z (``bh1``) or e^z - 1 (``bh2``), the rho_k solving sum_k rho_k r_k^(n-1) = n! z phi_{n+1}(z) / B(h).
    The predictor UniP-p uses the p - 1 previous D_k (rho = 1/2 for p = 2, as the paper's code and diffusers); the
    corrector UniC-p adds the new prediction D_t at t (r = 1, rho = 1/2 for p = 1) and replaces x_t. The network
    output at the uncorrected x_t is kept as D_t for the next step, so NFE = the number of visited timesteps.

    The order warms up (1, 2, ... on the first steps) and, with ``lower_order_final`` (diffusers' default), drops to
    min(order, steps left) at the end. The last step goes to sigma = 0 and returns the last x0 prediction (the
    first-order update's limit; no corrector follows it), as diffusers' ``final_sigmas_type="zero"``.
    """

    num_steps: int | None = 10
    spacing: Spacing = "logsnr"
    clip_denoised: bool = False  # the ODE solver as published; True clips each x0 prediction to [-1, 1]
    order: int = 2  # 2 for guided sampling, 3 for unconditional (the paper and diffusers' advice)
    variant: str = "bh2"  # B(h) = e^{-h} - 1 (bh2) or -h (bh1)
    corrector: bool = True  # UniC after each step but the last (no extra network evaluation)
    lower_order_final: bool = True
    name = "unipc"
    title = "UniPC"
    label_fields = ("variant", "order")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.order, bool) or self.order not in ORDERS:
            raise ConfigError(f"order={self.order!r} is not allowed; allowed values: {', '.join(map(str, ORDERS))} "
                              "(2 for guided sampling, 3 for unconditional)")
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant={self.variant!r} is not allowed; allowed values: {', '.join(VARIANTS)}")

    def run(self, denoiser: Denoiser, x: Tensor, noise: NoiseFn, cond: Condition | None = None) -> Tensor:
        steps = self.visited(denoiser.diffusion)
        ac = denoiser.diffusion.alphas_cumprod.detach().double().cpu()  # coefficients in float64, once
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        lam = (alpha.log() - sigma.log()).tolist()
        alpha, sigma = alpha.tolist(), sigma.tolist()
        history: list[tuple[int, Tensor]] = []  # (timestep, D) of the last `order` evaluations, newest last
        x_prev, p_prev = x, 0
        for i in self._progress(list(range(len(steps)))):
            t = steps[i]
            # 1. data prediction D_t at the (predicted, uncorrected) state
            d_t = denoiser(x, self._t(x, t), cond, clip_x0=self.clip_denoised).x0
            if i == len(steps) - 1:
                return d_t  # 4. sigma_next = 0: the update reduces to x = D_t (no corrector after it)
            # 2. UniC-p: redo the last step from x_{s_0} with D_t added
            if self.corrector and i > 0:
                x = self._update(x_prev, history, t, p_prev, lam, alpha, sigma, d_t)
            history = (history + [(t, d_t)])[-self.order:]
            # 3. UniP-p from t to the next visited timestep, with warm-up and lower order at the end
            p = min(self.order, len(history), len(steps) - i if self.lower_order_final else self.order)
            x_prev, p_prev = x, p
            x = self._update(x, history, steps[i + 1], p, lam, alpha, sigma)
        return x

    def _update(self, x: Tensor, history: list[tuple[int, Tensor]], t: int, p: int, lam: list[float],
                alpha: list[float], sigma: list[float], d_t: Tensor | None = None) -> Tensor:
        """x_t from x at history[-1]'s timestep s_0: UniP-p (``d_t`` None) or UniC-p with the new prediction D_t."""
        s0, d0 = history[-1]
        h = lam[t] - lam[s0]
        z = -h
        b_h = z if self.variant == "bh1" else math.expm1(z)
        # r_k, D1_k of the p - 1 previous predictions (and of D_t at r = 1 for the corrector)
        previous = history[-2:-p - 1:-1]  # s_1 .. s_{p-1}, newest first
        rs = [(lam[s] - lam[s0]) / h for s, _ in previous]
        d1s = [(d - d0) / r for r, (_, d) in zip(rs, previous)]
        if d_t is not None:
            rs, d1s = rs + [1.0], d1s + [d_t - d0]
        x_t = (sigma[t] / sigma[s0]) * x - (alpha[t] * math.expm1(z)) * d0
        if not rs:
            return x_t
        rhos = [0.5] if len(rs) == 1 else _rhos(rs, z, b_h)
        return x_t - (alpha[t] * b_h) * sum(rho * d1 for rho, d1 in zip(rhos, d1s))


def _rhos(rs: list[float], z: float, b_h: float) -> list[float]:
    """Solve sum_k rho_k r_k^(n-1) = n! z phi_{n+1}(z) / B(h), n = 1..K (the order conditions of UniP / UniC)."""
    g, factorial, z_phi = [], 1.0, math.expm1(z) / z - 1  # z phi_2(z)
    for n in range(1, len(rs) + 1):
        g.append(z_phi * factorial / b_h)
        factorial *= n + 1
        z_phi = z_phi / z - 1 / factorial  # z phi_{n+2}(z)
    r = torch.tensor([[rk ** n for rk in rs] for n in range(len(rs))], dtype=torch.float64)
    return torch.linalg.solve(r, torch.tensor(g, dtype=torch.float64)).tolist()
