"""The Gaussian forward process of DDPM (Ho et al. 2020) and its training loss.

Symbols (paper -> code): beta_t -> ``betas``, alpha_t = 1 - beta_t -> ``alphas``,
alpha-bar_t = prod_{s<=t} alpha_s -> ``alphas_cumprod``, beta-tilde_t -> ``posterior_variance``.
Timesteps are 0-based: t in [0, T), so the paper's t = 1 is index 0 here.

The object holds no trainable parameters: the network is passed to :meth:`GaussianDiffusion.loss`.
The schedule is kept in float64 registered buffers (moved by ``.to(device)``, saved in checkpoints) and
each lookup is cast to the dtype of the tensor it multiplies, as the original code did with numpy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.schedules import make_betas

PREDICTION_TYPES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")
VARIANCES = ("fixed_large", "fixed_small")

NetFn = Callable[[Tensor, Tensor], Tensor]


def extract(buffer: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``buffer[t]`` reshaped to broadcast against ``like`` (B, 1, 1, ...) and cast to its dtype."""
    return buffer[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process q(x_t | x_0), posterior q(x_{t-1} | x_t, x_0), parameterisation conversions and loss."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
        prediction_type: str = "eps",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; allowed: {', '.join(LOSS_WEIGHTINGS)}")
        if zero_terminal_snr and prediction_type == "eps":
            raise ValueError(
                "zero_terminal_snr=true with prediction_type=eps cannot recover x0 at the last step "
                "(alpha_bar_T = 0); use prediction_type=v (Lin et al. 2023, section 3.2)"
            )
        self.num_timesteps = num_timesteps
        self.schedule, self.beta_start, self.beta_end = schedule, beta_start, beta_end
        self.zero_terminal_snr = zero_terminal_snr
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma

        betas = make_betas(
            schedule,
            num_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            cosine_s=cosine_s,
            max_beta=max_beta,
            zero_terminal_snr=zero_terminal_snr,
        )
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # beta-tilde_t = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) * beta_t  (Ho et al. eq. 7)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)

        register = lambda name, value: self.register_buffer(name, value.to(torch.float64))  # noqa: E731
        register("betas", betas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        register("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        register("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt())
        register("posterior_variance", posterior_variance)
        # beta-tilde_0 = 0, so its log is clipped to log(beta-tilde_1), as in the original code.
        register("posterior_log_variance_clipped", torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log())
        # "fixed large" uses beta_t, with the same t = 0 substitution (Ho et al., diffusion_utils_2.py).
        register("large_log_variance", torch.cat([posterior_variance[1:2], betas[1:]]).log())
        # mu-tilde_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t  (Ho et al. eq. 7)
        register("posterior_mean_coef1", betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod))
        register("posterior_mean_coef2", (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod))
        register("snr", alphas_cumprod / (1 - alphas_cumprod))

    # --- forward process -------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps  (Ho et al. eq. 4)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0, extract(1 - self.alphas_cumprod, t, x0)

    # --- parameterisations: eps <-> x0 <-> v -----------------------------------------------------------
    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / extract(self.sqrt_alphas_cumprod, t, x_t)

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (x_t - extract(self.sqrt_alphas_cumprod, t, x_t) * x0) / extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)

    def v_from_x0_eps(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0  (Salimans & Ho 2022)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + extract(self.sqrt_alphas_cumprod, t, x_t) * v

    def predict_x0_eps(self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_x0: bool = False) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by the network's output under ``prediction_type``.

        With ``clip_x0`` the predicted x0 is clipped to [-1, 1] and eps is recomputed from the clipped x0,
        so that both describe the same point (diffusers' ``use_clipped_model_output``).
        """
        if self.prediction_type == "eps":
            eps = model_output
            x0 = self.x0_from_eps(x_t, t, eps)
        elif self.prediction_type == "x0":
            x0 = model_output
            eps = self.eps_from_x0(x_t, t, x0)
        else:
            x0 = self.x0_from_v(x_t, t, model_output)
            eps = self.eps_from_v(x_t, t, model_output)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.eps_from_x0(x_t, t, x0)
        return x0, eps

    # --- posterior q(x_{t-1} | x_t, x_0) ------------------------------------------------------------------
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance beta-tilde_t and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. eqs. 6-7)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    def reverse_log_variance(self, t: Tensor, like: Tensor, variance: str = "fixed_large") -> Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t): beta_t ("fixed_large") or beta-tilde_t ("fixed_small")."""
        if variance == "fixed_large":
            return extract(self.large_log_variance, t, like)
        if variance == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, like)
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")

    # --- training objective ---------------------------------------------------------------------------
    def training_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        if self.prediction_type == "eps":
            return noise
        if self.prediction_type == "x0":
            return x0
        return self.v_from_x0_eps(x0, t, noise)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-example weight. ``min_snr``: Hang et al. 2023, min(SNR, gamma) expressed for each target."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        snr = self.snr[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "eps":
            weight = clipped / snr.clamp(min=1e-20)
        elif self.prediction_type == "x0":
            weight = clipped
        else:
            weight = clipped / (snr + 1)
        return weight.float()

    def loss(self, net: NetFn, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """L_simple (Ho et al. eq. 14): per-example MSE between target and net(x_t, t), t ~ U{0, ..., T-1}.

        Returns ``(per_example_loss, t)`` so that callers can both reduce and break the loss down by timestep.
        """
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        output = net(x_t, t)
        if output.shape != x0.shape:
            raise ValueError(f"the network returned shape {tuple(output.shape)} for input {tuple(x0.shape)}")
        target = self.training_target(x0, t, noise)
        per_example = F.mse_loss(output.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_example * self.loss_weight(t), t

    def extra_repr(self) -> str:
        return f"T={self.num_timesteps}, schedule={self.schedule!r}, prediction_type={self.prediction_type!r}"
