"""The Gaussian forward process of DDPM (Ho et al. 2020): schedule, q_sample, posterior, conversions, VB terms.

Symbols (paper -> code): beta_t -> ``betas``, alpha_t = 1 - beta_t -> ``alphas``,
alpha-bar_t = prod_{s<=t} alpha_s -> ``alphas_cumprod``, beta-tilde_t -> ``posterior_variance``.
Timesteps are 0-based: t in [0, T), so the paper's t = 1 is index 0 here.

The object holds no trainable parameters and never calls a network: the denoiser
(:mod:`diffusion_lab.diffusion.denoiser`) decodes the network's output into a Prediction (x0, eps and, with
``variance="learned_range"``, v with log Sigma = frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1) / 2,
Nichol & Dhariwal 2021 eq. 15), and the objectives (:mod:`diffusion_lab.diffusion.losses`) train on it. The
``loss`` / ``loss_weighting`` / ``min_snr_gamma`` settings are kept here as the record of which objective a run
trains (:func:`~diffusion_lab.diffusion.losses.objective_for`), so every checkpoint's config still names it.
The schedule is kept in float64 registered buffers (moved by ``.to(device)``, saved in checkpoints) and
each lookup is cast to the dtype of the tensor it multiplies, as the original code did with numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.likelihood import LOG2, discretized_gaussian_log_likelihood, mean_over_dims, normal_kl
from diffusion_lab.diffusion.schedules import Schedule, make_betas
from diffusion_lab.errors import ConfigError

if TYPE_CHECKING:
    from diffusion_lab.diffusion.denoiser import Prediction

# The allowed values, once: the constructors' annotations; the config check reads them from the signatures.
PredictionType = Literal["eps", "x0", "v"]
LossWeighting = Literal["none", "min_snr"]
Variance = Literal["fixed_large", "fixed_small", "learned_range"]
Loss = Literal["simple", "vlb", "hybrid"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSSES: tuple[str, ...] = get_args(Loss)
# Training only (a sampling-only object of a learned-variance model may keep the default loss): the config check of
# diffusion-lab-train refuses the pair at start-up with this message, and the loss itself if it gets that far.
LEARNED_SIMPLE_MESSAGE = ("diffusion.variance=learned_range needs a loss that trains the variance: L_simple gives it "
                          "no gradient; use diffusion.loss=hybrid (Improved DDPM) or diffusion.loss=vlb")
# Improved DDPM's lambda for L_hybrid = L_simple + lambda L_vlb (section 3.1).
HYBRID_LAMBDA = 0.001


def extract(buffer: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``buffer[t]`` reshaped to broadcast against ``like`` (B, 1, 1, ...) and cast to its dtype."""
    return buffer[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process q(x_t | x_0), posterior q(x_{t-1} | x_t, x_0), parameterisation conversions and loss."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: Schedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
        prediction_type: PredictionType = "eps",
        loss_weighting: LossWeighting = "none",
        min_snr_gamma: float = 5.0,
        variance: Variance = "fixed_large",
        loss: Loss = "simple",
        quantization_levels: int = 256,
    ) -> None:
        super().__init__()
        for key, value, allowed in (("variance", variance, VARIANCES), ("loss", loss, LOSSES),
                                    ("prediction_type", prediction_type, PREDICTION_TYPES),
                                    ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS)):
            if value not in allowed:
                raise ConfigError(f"diffusion.{key}={value!r} is not allowed; allowed values: {', '.join(allowed)}")
        if loss == "hybrid" and variance != "learned_range":
            raise ConfigError("diffusion.loss=hybrid trains only the variance through L_vlb (the mean is stop-"
                              "gradiented), so it needs diffusion.variance=learned_range; with a fixed variance use "
                              "diffusion.loss=simple or vlb")
        if isinstance(quantization_levels, bool) or not isinstance(quantization_levels, int) or quantization_levels < 2:
            raise ConfigError(f"diffusion.quantization_levels={quantization_levels!r}: needs an integer >= 2 (256 for "
                              "8-bit images, 17 for the digits)")
        if zero_terminal_snr and prediction_type == "eps":
            raise ConfigError(
                "zero_terminal_snr=true with prediction_type=eps cannot recover x0 at the last step "
                "(alpha_bar_T = 0); use prediction_type=v (Lin et al. 2023, section 3.2)"
            )
        if not min_snr_gamma > 0:
            raise ConfigError(f"diffusion.min_snr_gamma={min_snr_gamma}: needs a positive number (5 in Hang et al. 2023)")
        self.variance, self.loss_type, self.quantization_levels = variance, loss, quantization_levels
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
        # learned_range interpolates between log beta-tilde (clipped) and log beta_t itself (improved-diffusion).
        register("log_betas", betas.log())
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

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

    # --- posterior q(x_{t-1} | x_t, x_0) ------------------------------------------------------------------
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance beta-tilde_t and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. eqs. 6-7)."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x0 + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    def reverse_log_variance(
        self, t: Tensor, like: Tensor, variance: str | None = None, v: Tensor | None = None
    ) -> Tensor:
        """log sigma_t^2 of p(x_{t-1} | x_t): beta_t ("fixed_large"), beta-tilde_t ("fixed_small") or the learned
        interpolation frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1) / 2 ("learned_range",
        Improved DDPM eq. 15). ``variance`` defaults to this diffusion's own."""
        variance = variance or self.variance
        if variance == "fixed_large":
            return extract(self.large_log_variance, t, like)
        if variance == "fixed_small":
            return extract(self.posterior_log_variance_clipped, t, like)
        if variance == "learned_range":
            if v is None:
                raise ConfigError("variance=learned_range needs a learned-variance model (2C output channels); this model "
                                  f"has a fixed variance: use variance={self.variance}")
            return interpolate_log_variance(v, extract(self.log_betas, t, like), extract(self.posterior_log_variance_clipped, t, like))
        raise ConfigError(f"variance={variance!r} is not allowed; allowed values: {', '.join(VARIANCES)}")

    def p_mean_variance(
        self, prediction: "Prediction", x_t: Tensor, t: Tensor, clip_x0: bool = False, variance: str | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, log-variance and predicted x_0 of p(x_{t-1} | x_t) from the denoiser's prediction (Ho et al. eq. 11
        through the posterior mean of eq. 7), with this diffusion's variance or the fixed one named."""
        x0 = prediction.x0.clamp(-1, 1) if clip_x0 else prediction.x0
        mean, _, _ = self.q_posterior(x0, x_t, t)
        return mean, self.reverse_log_variance(t, x_t, variance=variance, v=prediction.v), x0

    # --- the variational bound (Ho et al. eq. 5), in bits per dimension -----------------------------------
    def vb_terms(
        self,
        prediction: "Prediction",
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_x0: bool = False,
        variance: str | None = None,
        quantization_levels: int | None = None,
    ) -> Tensor:
        """Per-example L_{t-1} in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL -log p(x_0|x_1) at t = 0 (0-based t; improved-diffusion's ``_vb_terms_bpd``).

        ``variance`` (default: this diffusion's) and ``quantization_levels`` (default: this diffusion's) let an
        evaluation score a fixed-variance model either way, on data of any bit depth.
        """
        levels = quantization_levels or self.quantization_levels
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        mean, log_var, _ = self.p_mean_variance(prediction, x_t, t, clip_x0=clip_x0, variance=variance)
        # Both terms for every example, then picked by t: asking whether any t is 0 would be a host read (a device
        # sync and a torch.compile graph break per training step) to save a few elementwise ops.
        kl = mean_over_dims(normal_kl(true_mean.double(), true_log_var.double(), mean.double(), log_var.double()))
        nll = -mean_over_dims(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, levels))
        terms = torch.where(t == 0, nll, kl)
        return (terms / LOG2).to(x0.dtype)

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per example in bits/dim (no parameters: a constant of the data)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, var = self.q_mean_variance(x0.double(), t)
        kl = normal_kl(mean, var.log().expand_as(mean), torch.zeros_like(mean), torch.zeros_like(mean))
        return (mean_over_dims(kl) / LOG2).to(x0.dtype)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Every buffer is a function of the constructor's arguments. A checkpoint written before a buffer was added
        # (e.g. ``log_betas``, new with learned variances) lacks it: keep the value computed here instead of failing
        # a strict load, so that older checkpoints still load, resume and sample.
        for name, buffer in self._buffers.items():
            if buffer is not None and prefix + name not in state_dict:
                state_dict[prefix + name] = buffer
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"T={self.num_timesteps}, schedule={self.schedule!r}, prediction_type={self.prediction_type!r}, "
                f"variance={self.variance!r}, loss={self.loss_type!r}")


def interpolate_log_variance(v: Tensor, max_log: Tensor, min_log: Tensor) -> Tensor:
    """log Sigma = frac max_log + (1 - frac) min_log with frac = (v + 1) / 2 (Improved DDPM eq. 15; v in [-1, 1]
    nominally but not clipped, as in improved-diffusion). Shared by the full chain and strided DDPM sampling."""
    frac = (v + 1) / 2
    return frac * max_log + (1 - frac) * min_log
