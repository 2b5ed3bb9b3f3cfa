"""Progressive distillation's maths (diffusion_lab/training/distill.py), against closed forms and the real sampler.

Gaussian data x ~ N(mu, s^2) (each pixel independent) has a closed-form optimal denoiser, E[x | z_t] =
mu + k_t (z_t - alpha_t mu) with k_t = alpha_t s^2 / (alpha_t^2 s^2 + sigma_t^2), so a teacher is exact and the
two-step DDIM map of the teacher is an affine map computed here in float64 without the library's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.errors import ConfigError
from diffusion_lab.samplers.ddim import DDIMSampler
from diffusion_lab.samplers.timesteps import timesteps
from diffusion_lab.training.distill import (DistillationObjective, DistillationSchedule, check_schedule, ddim_step,
                                            distillation_target, max_steps, nested_steps)

MU, S = 0.3, 0.5
SHAPE = (6, 1, 4, 4)


def ab(diffusion: GaussianDiffusion, t: int) -> tuple[float, float]:
    """(alpha_t, sigma_t) as Python floats; t = -1 is the clean image."""
    abar = 1.0 if t < 0 else float(diffusion.alphas_cumprod[t])
    return math.sqrt(abar), math.sqrt(1 - abar)


def x0_closed_form(z: Tensor, alpha: float, sigma: float) -> Tensor:
    return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)


def ddim_closed_form(diffusion: GaussianDiffusion, z: Tensor, t: int, t_next: int) -> Tensor:
    """One DDIM step (eta 0) with the exact denoiser: z' = alpha' x^ + sigma' (z - alpha x^) / sigma."""
    (a, s), (a2, s2) = ab(diffusion, t), ab(diffusion, t_next)
    x0 = x0_closed_form(z, a, s)
    return a2 * x0 + s2 * (z - a * x0) / s


class GaussianNet(nn.Module):
    """The exact denoiser of N(MU, S^2) data in a prediction type: eps, or v (of the x0 ``target(z, t)``)."""

    def __init__(self, diffusion: GaussianDiffusion, prediction: str, target=None) -> None:
        super().__init__()
        self.diffusion, self.prediction, self.target = diffusion, prediction, target

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        abar = self.diffusion.alphas_cumprod[t].to(z.dtype).view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        if self.target is None:
            x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)
        else:
            x0 = torch.stack([self.target(z[k:k + 1], int(t[k])) for k in range(len(t))])[:, 0]
        if self.prediction == "eps":
            return (z - alpha * x0) / sigma
        return (alpha * z - x0) / sigma  # v, since x0 = alpha z - sigma v


def test_trailing_spacing_of_n_steps_is_every_other_of_2n():
    """The student's timesteps are the teacher's even-indexed ones, so each student step spans two teacher steps."""
    for T in (1000, 4000, 100):
        n = 1
        while 2 * n <= T:
            student, teacher = timesteps(T, n, "trailing"), timesteps(T, 2 * n, "trailing")
            assert len(student) == n and len(teacher) == 2 * n
            assert teacher[0::2] == student, (T, n)
            assert student[0] == T - 1
            n *= 2
    assert nested_steps(1000, 4) == ([999, 749, 499, 249], [999, 874, 749, 624, 499, 374, 249, 124])


def test_the_batched_ddim_step_is_the_samplers_step():
    diffusion = GaussianDiffusion(1000).double()
    denoiser = Denoiser(GaussianNet(diffusion, "eps"), diffusion)
    z = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = DDIMSampler(num_steps=8, spacing="trailing", eta=0.0, clip_denoised=False)
    for t, t_next in [(999, 874), (374, 249), (124, -1)]:
        full = torch.full((SHAPE[0],), t)
        ours = ddim_step(denoiser, z, full, torch.full((SHAPE[0],), t_next))
        assert torch.allclose(ours, sampler.step(denoiser, z, t, t_next, noise=None), rtol=0, atol=1e-12)
        assert torch.allclose(ours, ddim_closed_form(diffusion, z, t, t_next), rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_the_target_in_closed_form_and_one_student_step_lands_where_two_teacher_steps_do(num_steps):
    """x~ from two teacher steps equals the analytic value; a student that outputs x~ (as v) takes the teacher's
    2N-step DDIM trajectory in N steps, end point included (the real DDIMSampler on both)."""
    diffusion = GaussianDiffusion(1000).double()
    teacher = Denoiser(GaussianNet(diffusion, "eps"), diffusion)
    student_steps, teacher_steps = nested_steps(1000, num_steps)
    step_of = {t: i for i, t in enumerate(student_steps)}
    after = student_steps[1:] + [-1]

    def x_tilde(z: Tensor, t: int) -> Tensor:
        """Analytic: the two exact DDIM steps as float64 formulas, then x~ = (z'' - r z) / (alpha'' - r alpha)."""
        i = step_of[t]
        mid, nxt = teacher_steps[2 * i + 1], after[i]
        z2 = ddim_closed_form(diffusion, ddim_closed_form(diffusion, z, t, mid), mid, nxt)
        (a, s), (a2, s2) = ab(diffusion, t), ab(diffusion, nxt)
        return (z2 - s2 / s * z) / (a2 - s2 / s * a)

    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(student_steps):
        z = torch.randn(SHAPE, dtype=torch.float64, generator=g)
        tt, tm, tn = (torch.full((SHAPE[0],), v) for v in (t, teacher_steps[2 * i + 1], after[i]))
        z_next = ddim_step(teacher, ddim_step(teacher, z, tt, tm), tm, tn)
        ours = distillation_target(diffusion, z, tt, z_next, tn)
        assert torch.allclose(ours, x_tilde(z, t), rtol=1e-9, atol=1e-9), t
        if after[i] == -1:
            assert torch.allclose(ours, z_next, rtol=0, atol=1e-12)  # to the clean image: x~ = z''

    student_diffusion = GaussianDiffusion(1000, prediction_type="v").double()
    student = Denoiser(GaussianNet(student_diffusion, "v", target=x_tilde), student_diffusion)
    x_T = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    ddim = DDIMSampler(num_steps=2 * num_steps, spacing="trailing", eta=0.0, clip_denoised=False)
    two = ddim.sample(teacher, None, SHAPE, x_T=x_T)
    one = DDIMSampler(num_steps=num_steps, spacing="trailing", eta=0.0, clip_denoised=False).sample(
        student, None, SHAPE, x_T=x_T)
    assert torch.allclose(one, two, rtol=0, atol=1e-8)
    assert (one - x_T).abs().max() > 0.1  # a real trajectory


def test_the_loss_is_truncated_snr_weighted_x_mse():
    """max(SNR_t, 1) ||x~ - x^||^2: zero for the exact student, weight * c^2 for one off by c everywhere."""
    diffusion = GaussianDiffusion(1000).double()
    teacher = Denoiser(GaussianNet(diffusion, "eps"), diffusion)
    student_steps, teacher_steps = nested_steps(1000, 4)
    objective = DistillationObjective(teacher, tuple(student_steps), tuple(teacher_steps))
    after = student_steps[1:] + [-1]

    def exact(z: Tensor, t: int, offset: float = 0.0) -> Tensor:
        i = student_steps.index(t)
        tt, tm, tn = (torch.full((1,), v) for v in (t, teacher_steps[2 * i + 1], after[i]))
        z_next = ddim_step(teacher, ddim_step(teacher, z, tt, tm), tm, tn)
        return distillation_target(diffusion, z, tt, z_next, tn) + offset

    x = MU + S * torch.randn((64, 1, 4, 4), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for offset in (0.0, 0.1):
        net = GaussianNet(diffusion, "eps", target=lambda z, t: exact(z, t, offset))
        loss, t = objective(Denoiser(net, diffusion), x, generator=torch.Generator().manual_seed(3))
        weight = diffusion.snr[t].clamp(min=1).float()
        assert set(t.tolist()) <= set(student_steps) and len(set(t.tolist())) > 1
        assert torch.allclose(loss, weight * offset**2, rtol=1e-5, atol=1e-7)


def test_the_schedule_halves_from_start_to_end():
    schedule = DistillationSchedule(64, 1, 400, reparam_steps=300, warmup_steps=10, lr_decay="linear")
    assert [(p.kind, p.num_steps, p.start, p.length) for p in schedule.phases] == [
        ("reparam", 64, 0, 300), ("round", 32, 300, 400), ("round", 16, 700, 400), ("round", 8, 1100, 400),
        ("round", 4, 1500, 400), ("round", 2, 1900, 400), ("round", 1, 2300, 400)]
    assert schedule.total_steps == max_steps(64, 1, 400, 300) == 2700
    assert [schedule.phase_at(s).index for s in (0, 299, 300, 699, 700, 2699, 5000)] == [0, 0, 1, 1, 2, 6, 6]
    # per phase: warm-up over 10 steps, then linear decay to 0 at the phase's end
    assert schedule.lr_factor(300) == pytest.approx(0.1)
    assert schedule.lr_factor(309) == pytest.approx(1 - 9 / 400)
    assert schedule.lr_factor(699) == pytest.approx(1 / 400)
    flat = DistillationSchedule(8, 2, 5, round_lr=[1e-3, 5e-4], lr_decay="constant")
    assert [(p.num_steps, p.lr) for p in flat.phases] == [(4, 1e-3), (2, 5e-4)]
    assert {flat.lr_factor(s) for s in range(10)} == {1.0}


@pytest.mark.parametrize("args, message", [
    ((48, 1, 10), r"model.start_steps=48 cannot halve to model.end_steps=1 \(48 -> 24 -> 12 -> 6 -> 3 -> 1.5\): "
                  r"start_steps / end_steps must be a power of two, e.g. model.start_steps=64"),
    ((64, 3, 10), r"cannot halve to model.end_steps=3 \(64 -> 32 -> 16 -> 8 -> 4 -> 2\)"),
    ((64, 128, 10), r"model.end_steps=128 is not below model.start_steps=64: each round halves"),
    ((64, 64, 10), r"model.end_steps=64 is not below model.start_steps=64"),
    ((64, 1, 0), r"model.steps_per_round=0: needs a whole number >= 1"),
    ((1, 1, 10), r"model.start_steps=1: needs a whole number >= 2"),
])
def test_a_schedule_that_cannot_run_is_refused_by_name(args, message):
    with pytest.raises(ConfigError, match=message):
        check_schedule(*args)


def test_round_learning_rates_need_one_per_round():
    message = r"model.round_lr=\[0.001\]: needs one learning rate > 0 per round \(2 rounds"
    with pytest.raises(ConfigError, match=message):
        DistillationSchedule(8, 2, 5, round_lr=[1e-3])
