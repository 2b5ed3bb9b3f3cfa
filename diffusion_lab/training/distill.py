"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models",
Algorithm 2): a student learns to take in one deterministic DDIM step what its teacher takes in two; the student
becomes the next teacher and the number of steps halves, round after round.

Symbols (paper -> code): alpha_t = sqrt(alpha-bar_t), sigma_t = sqrt(1 - alpha-bar_t); z_t = alpha_t x + sigma_t eps
(``q_sample``); x~ the distillation target; x^ the student's x0 prediction; N the student's number of steps.

One round, the student with N DDIM steps (eta 0, ``trailing`` spacing) and its teacher with 2N: the N-step list is
every other element of the 2N-step list (:func:`nested_steps`), so student step i goes from t = s[i] through the
teacher's t' = T2[2i + 1] to t'' = s[i + 1] (the clean image after the last step):

1. x ~ data, i ~ U{0..N-1}, eps ~ N(0, I); z_t = alpha_t x + sigma_t eps.
2. Two teacher DDIM steps (:func:`ddim_step`): z_t -> z_t' -> z_t''.
3. The target x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
   (:func:`distillation_target`): the x0 with which one DDIM step from z_t lands exactly on z_t''. After the last
   step (sigma = 0, alpha = 1) it is z_t'' itself.
4. Loss: max(SNR_t, 1) ||x~ - x^(z_t)||^2, the paper's "truncated SNR" weighting (= max(||x - x^||^2,
   ||eps - eps^||^2)): x-space MSE, never weighted below the eps-MSE.

The student's prediction type (``student_prediction``, default ``v``): the loss is on x^ whatever the network outputs,
but the output matters. An eps-predicting student decodes x^ = (z_t - sigma_t eps^) / alpha_t, which multiplies the
network's error by sigma_t/alpha_t (~160 at the last trailing timestep of the linear schedule): with few steps the
first step starts at almost pure noise, and the paper reports that eps-students stop working there. v = alpha_t eps -
sigma_t x (the paper's choice) decodes x^ = alpha_t z_t - sigma_t v^, bounded at every t.

When the student's prediction type differs from the teacher's (the default digits teacher predicts eps), the copied
weights first learn the new output: ``reparam_steps`` ordinary L_simple steps (:class:`SimpleLoss` against the v
target, say) on the data, before round 1. Every phase (the reparameterisation, each round) starts the student
from the previous phase's EMA weights, with a fresh Adam state and the learning rate warmed up over
``warmup_steps`` and (``lr_decay=linear``) decayed linearly towards 0 over the phase.

Checkpoints: the run's own (``last.ckpt``, ``step_*.ckpt``) resume it exactly, mid-round included (student, EMA,
optimizer, RNG, phase, teacher identity); after each round the student is written as an ordinary checkpoint,
``student_<N>steps.ckpt``, that ``diffusion-lab-sample``, ``diffusion-lab-eval``, the pipelines and a next
distillation (``teacher=``) load like any trained model, its sampler the N-step DDIM it was distilled for.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion, PredictionType
from diffusion_lab.diffusion.losses import Objective, SimpleLoss
from diffusion_lab.errors import CheckpointError, CheckpointNotFoundError, ConfigError
from diffusion_lab.samplers.ddim import DDIMSampler
from diffusion_lab.samplers.timesteps import timesteps
from diffusion_lab.training.module import DiffusionModule

log = logging.getLogger(__name__)

LRDecay = Literal["linear", "constant"]
STUDENT_FILE = "student_{:03d}steps.ckpt"
REPORT_FILE = "distillation.json"


# --- the maths ----------------------------------------------------------------------------------------
def alpha_bar(diffusion: GaussianDiffusion, t: Tensor, like: Tensor) -> Tensor:
    """alpha-bar_t in float64, shaped (B, 1, ...) to broadcast against ``like``; 1 for t = -1 (the clean image)."""
    abar = diffusion.alphas_cumprod[t.clamp(min=0)]
    return torch.where(t >= 0, abar, torch.ones_like(abar)).view(-1, *([1] * (like.ndim - 1)))


def ddim_step(denoiser: Denoiser, z: Tensor, t: Tensor, t_next: Tensor, cond: Condition | None = None) -> Tensor:
    """One deterministic DDIM step per example from t to t_next (-1: to the clean image), DDIM eq. 12 with eta 0:
    z_next = alpha_next x^ + sigma_next eps^ (what :class:`DDIMSampler` does for one shared t, batched over t)."""
    prediction = denoiser(z, t, cond)
    abar_next = alpha_bar(denoiser.diffusion, t_next, z).to(z.dtype)
    return abar_next.sqrt() * prediction.x0 + (1 - abar_next).sqrt() * prediction.eps


def distillation_target(diffusion: GaussianDiffusion, z_t: Tensor, t: Tensor, z_next: Tensor, t_next: Tensor) -> Tensor:
    """x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t) (Algorithm 2): the x0 for
    which one DDIM step from (z_t, t) lands on z_t'' at t_next; z_t'' itself after the last step (t_next = -1).
    Computed in float64 (the denominator is small at high noise), returned in z_t's dtype."""
    abar_t, abar_n = alpha_bar(diffusion, t, z_t), alpha_bar(diffusion, t_next, z_t)
    alpha_t, sigma_t, alpha_n, sigma_n = abar_t.sqrt(), (1 - abar_t).sqrt(), abar_n.sqrt(), (1 - abar_n).sqrt()
    ratio = sigma_n / sigma_t
    return ((z_next.double() - ratio * z_t.double()) / (alpha_n - ratio * alpha_t)).to(z_t.dtype)


def nested_steps(num_timesteps: int, student_steps: int) -> tuple[list[int], list[int]]:
    """(the student's N trailing timesteps, the teacher's 2N), checked to be nested: student = teacher[0::2]."""
    student = timesteps(num_timesteps, student_steps, "trailing")
    teacher = timesteps(num_timesteps, 2 * student_steps, "trailing")
    if len(student) != student_steps or len(teacher) != 2 * student_steps or teacher[0::2] != student:
        raise ConfigError(f"the trailing spacings of {student_steps} and {2 * student_steps} steps over T="
                          f"{num_timesteps} are not nested (every other of the {2 * student_steps} steps); use "
                          f"model.start_steps <= {num_timesteps}")
    return student, teacher


@dataclasses.dataclass(frozen=True)
class DistillationObjective(Objective):
    """Algorithm 2's loss for one round: ``objective(student, x, cond) -> (max(SNR_t, 1) ||x~ - x^||^2, t)``.

    ``teacher`` is a frozen denoiser (no gradients flow through it); ``student_steps`` (N, descending) and
    ``teacher_steps`` (2N) are the nested trailing lists of :func:`nested_steps`.
    """

    teacher: Denoiser
    student_steps: tuple[int, ...]
    teacher_steps: tuple[int, ...]
    _tables: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __call__(self, denoiser: Denoiser, x0: Tensor, cond: Condition | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        d = denoiser.diffusion
        t_table, mid_table, next_table = self._on(x0.device)
        # 1. a student step i per example, its (t, t', t''), and z_t
        i = torch.randint(0, len(self.student_steps), (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t, t_mid, t_next = t_table[i], mid_table[i], next_table[i]
        z_t = d.q_sample(x0, t, noise)
        # 2. two teacher DDIM steps; 3. the x0 that makes one step land where they did
        with torch.no_grad():
            z_mid = ddim_step(self.teacher, z_t, t, t_mid, cond)
            z_next = ddim_step(self.teacher, z_mid, t_mid, t_next, cond)
            target = distillation_target(d, z_t, t, z_next, t_next)
        # 4. the student's x^ and the truncated-SNR weighted x-space MSE
        x_hat = denoiser(z_t, t, cond).x0
        mse = F.mse_loss(x_hat.float(), target.float(), reduction="none").flatten(1).mean(1)
        return d.snr[t].clamp(min=1).float() * mse, t

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(t, t', t'') per student step, as index tables on ``device`` (built once per device)."""
        key = str(device)
        if key not in self._tables:
            s, tt = list(self.student_steps), list(self.teacher_steps)
            self._tables[key] = tuple(torch.tensor(v, dtype=torch.long, device=device)
                                      for v in (s, tt[1::2], s[1:] + [-1]))
        return self._tables[key]


# --- the schedule -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training steps [start, start + length): the reparameterisation or one round."""

    index: int
    kind: Literal["reparam", "round"]
    round: int | None      # 1-based round number; None for the reparameterisation
    num_steps: int         # the student's DDIM steps (reparam: the first teacher's, what it samples with)
    start: int
    length: int
    lr: float | None = None  # this round's learning rate (model.round_lr); None: the optimizer's

    @property
    def end(self) -> int:
        return self.start + self.length

    def describe(self) -> str:
        if self.kind == "reparam":
            return f"reparameterisation ({self.length} steps)"
        return f"round {self.round} ({2 * self.num_steps} -> {self.num_steps} steps)"


def check_schedule(start_steps: Any, end_steps: Any, steps_per_round: Any, reparam_steps: Any = 0) -> int:
    """The number of rounds (halvings from start_steps down to end_steps); ConfigError for a schedule that cannot
    run, naming the key and the fix. Used by the module and by the ``${distill_max_steps:...}`` resolver."""
    for key, value, least in (("start_steps", start_steps, 2), ("end_steps", end_steps, 1),
                              ("steps_per_round", steps_per_round, 1), ("reparam_steps", reparam_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"model.{key}={value!r}: needs a whole number >= {least}")
    if end_steps >= start_steps:
        raise ConfigError(f"model.end_steps={end_steps} is not below model.start_steps={start_steps}: each round "
                          "halves the steps, from start_steps (the first teacher's DDIM steps) down to end_steps (the "
                          "last student's), e.g. model.start_steps=64 model.end_steps=1")
    ratio = start_steps // end_steps
    if start_steps % end_steps or ratio & (ratio - 1):
        halvings, n = [str(start_steps)], float(start_steps)
        while n > end_steps and n == int(n) and len(halvings) < 12:
            n /= 2
            halvings.append(f"{n:g}")
        raise ConfigError(f"model.start_steps={start_steps} cannot halve to model.end_steps={end_steps} "
                          f"({' -> '.join(halvings)}): start_steps / end_steps must be a power of two, e.g. "
                          f"model.start_steps={end_steps * 2 ** max(1, round(math.log2(max(ratio, 1))))}")
    return ratio.bit_length() - 1


def max_steps(start_steps: int, end_steps: int, steps_per_round: int, reparam_steps: int = 0) -> int:
    """Training steps of a whole run: every round, plus the reparameterisation (run when the student's prediction
    type differs from the teacher's; otherwise the module stops ``reparam_steps`` earlier)."""
    return check_schedule(start_steps, end_steps, steps_per_round, reparam_steps) * steps_per_round + reparam_steps


class DistillationSchedule:
    """The phases of a run, in order: [reparameterisation], round 1 (start_steps -> start_steps / 2), ... down to
    end_steps; and the learning rate at each step."""

    def __init__(self, start_steps: int, end_steps: int, steps_per_round: int, reparam_steps: int = 0,
                 round_lr: Sequence[float] | None = None, warmup_steps: int = 0, lr_decay: LRDecay = "linear") -> None:
        rounds = check_schedule(start_steps, end_steps, steps_per_round, reparam_steps)
        if round_lr is not None:
            round_lr = [float(v) for v in round_lr]
            if len(round_lr) != rounds or not all(v > 0 for v in round_lr):
                raise ConfigError(f"model.round_lr={round_lr}: needs one learning rate > 0 per round ({rounds} rounds, "
                                  f"{start_steps} -> {end_steps} steps), or null for model.optimizer.lr in every round")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ConfigError(f"model.warmup_steps={warmup_steps!r}: needs a whole number >= 0 (0: no warm-up)")
        if lr_decay not in ("linear", "constant"):
            raise ConfigError(f"model.lr_decay={lr_decay!r} is not allowed; allowed values: linear, constant")
        self.start_steps, self.end_steps, self.steps_per_round = start_steps, end_steps, steps_per_round
        self.reparam_steps, self.warmup_steps, self.lr_decay = reparam_steps, warmup_steps, lr_decay
        phases: list[Phase] = []
        if reparam_steps:
            phases.append(Phase(0, "reparam", None, start_steps, 0, reparam_steps))
        for r in range(rounds):
            start = reparam_steps + r * steps_per_round
            phases.append(Phase(len(phases), "round", r + 1, start_steps >> (r + 1), start, steps_per_round,
                                None if round_lr is None else round_lr[r]))
        self.phases = phases

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end

    @property
    def rounds(self) -> list[Phase]:
        return [p for p in self.phases if p.kind == "round"]

    def phase_at(self, step: int) -> Phase:
        """The phase that optimizer step ``step`` (0-based) belongs to (the last one from its end on)."""
        for phase in self.phases:
            if step < phase.end:
                return phase
        return self.phases[-1]

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` relative to the phase's own: warm-up over ``warmup_steps``, then constant
        or linear decay to 0 at the phase's end (never 0 at a step that is taken)."""
        phase = self.phase_at(step)
        k = step - phase.start
        warm = min(1.0, (k + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay = 1.0 - k / phase.length if self.lr_decay == "linear" else 1.0
        return warm * decay

    def record(self) -> dict[str, Any]:
        return {"start_steps": self.start_steps, "end_steps": self.end_steps, "steps_per_round": self.steps_per_round,
                "reparam_steps": self.reparam_steps, "total_steps": self.total_steps}


# --- the teacher ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Teacher:
    """A frozen teacher outside the module tree (no state_dict keys; the module's ``_apply`` moves it)."""

    net: nn.Module
    diffusion: GaussianDiffusion
    identity: dict[str, Any]  # {"path", "sha256"}: what a checkpoint records and a resume checks
    config: dict[str, Any] | None = None  # the checkpoint's run config (the original teacher's: the students' base)

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.diffusion)


def load_teacher(path: Any, key: str = "teacher") -> Teacher:
    """A trained checkpoint's EMA net, frozen (eval mode, no gradients), through the project's safe loader."""
    from diffusion_lab.loading import file_sha256
    from diffusion_lab.training.checkpoints import load_module

    example = "teacher=runs/digits/<date>_<time>/checkpoints/last.ckpt"
    if path is None or str(path).strip() in ("", "null", "None", "???"):
        raise ConfigError(f"{key} is required: the trained checkpoint to distil, e.g. {example} (a "
                          "diffusion-lab-train checkpoint, or a student_<N>steps.ckpt of an earlier distillation)")
    file = Path(str(path)).expanduser()
    if file.is_dir():
        inside = next((p for p in (file / "checkpoints" / "last.ckpt", file / "last.ckpt") if p.is_file()), None)
        hint = f"{key}={inside}" if inside is not None else example
        raise CheckpointNotFoundError(f"{key}={path} is a folder, not a checkpoint file; give the file, e.g. {hint}")
    if not file.is_file():
        raise CheckpointNotFoundError(f"{key}={path} does not exist; give a trained checkpoint file, e.g. {example}")
    module = load_module(file)
    diffusion, net = module.diffusion, module.ema_net
    if diffusion.learned_variance:
        raise ConfigError(f"{key}={path} has a learned variance (diffusion.variance=learned_range); distillation "
                          "follows the deterministic DDIM path, which needs no variance: distil a fixed-variance model")
    if getattr(net.config, "num_classes", None) is not None:
        raise ConfigError(f"{key}={path} is class-conditional (model.net.num_classes={net.config.num_classes}); "
                          "distilling conditional models is not supported yet: distil an unconditional one")
    net.eval().requires_grad_(False)
    return Teacher(net, diffusion, {"path": str(file.resolve()), "sha256": file_sha256(file)}, module.run_config)


# --- the LightningModule --------------------------------------------------------------------------------
class DistillationModule(DiffusionModule):
    """Progressive distillation (module docstring) on the :class:`DiffusionModule` machinery: the student is ``net``
    (with its EMA, ``ema``), trained through ``self.objective`` (L_simple while reparameterising, then one
    :class:`DistillationObjective` per round); the frozen teacher lives outside the module tree.

    ``teacher``: the trained checkpoint to start from (its EMA weights). ``start_steps``: the DDIM steps of the
    first teacher; each round halves them, down to the last student's ``end_steps``. ``diffusion`` and ``sampler``
    (from the train command's config) are checked against the teacher's process and the DDIM the students use.
    """

    def __init__(
        self,
        teacher: str | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        diffusion: GaussianDiffusion | None = None,
        sampler: DDIMSampler | None = None,
        start_steps: int = 64,
        end_steps: int = 1,
        steps_per_round: int = 400,
        student_prediction: PredictionType = "v",
        reparam_steps: int = 400,
        warmup_steps: int = 20,
        lr_decay: LRDecay = "linear",
        round_lr: list[float] | None = None,
        ema_decay: float = 0.99,
        dirpath: str | None = None,
    ) -> None:
        check_schedule(start_steps, end_steps, steps_per_round, reparam_steps)  # before reading the teacher
        original = load_teacher(teacher)
        if original.config is None or "diffusion" not in original.config:
            raise CheckpointError(f"teacher={teacher} holds no run config to build the students from")
        student_diffusion = _student_diffusion(original, student_prediction)
        _check_process(diffusion, student_diffusion, student_prediction)
        T = student_diffusion.num_timesteps
        if start_steps > T:
            raise ConfigError(f"model.start_steps={start_steps} exceeds the {T} timesteps the teacher was trained "
                              f"with; use model.start_steps <= {T}")
        needs_reparam = student_prediction != original.diffusion.prediction_type
        if needs_reparam and reparam_steps == 0:
            raise ConfigError(f"model.student_prediction={student_prediction} differs from the teacher's "
                              f"{original.diffusion.prediction_type}: the copied weights must first learn the new "
                              "output; set model.reparam_steps (e.g. 400), or model.student_prediction="
                              f"{original.diffusion.prediction_type}")
        schedule = DistillationSchedule(start_steps, end_steps, steps_per_round, reparam_steps if needs_reparam else 0,
                                        round_lr, warmup_steps, lr_decay)
        for phase in schedule.rounds:
            nested_steps(T, phase.num_steps)
        template = _check_sampler(sampler)
        student = copy.deepcopy(original.net).requires_grad_(True).train()
        first = schedule.phases[0]
        super().__init__(student, student_diffusion, optimizer, None, sampler=None, ema_decay=ema_decay,
                         objective=SimpleLoss() if first.kind == "reparam" else None)
        self.schedule, self.sampler_template, self.dirpath = schedule, template, dirpath
        self.student_prediction = student_prediction
        self.original_teacher = original
        self._teacher = original  # a plain attribute: a dataclass, not registered as a submodule
        self._phase = 0            # index into schedule.phases
        self._finished = False     # whether the current phase's end (student file, times) has been written
        self._students: list[dict[str, Any]] = []
        self._clock = (0.0, 0.0, time.perf_counter(), time.process_time())  # (wall, cpu) before + start marks
        self._base_lrs: list[float] | None = None
        self._use_phase(first)

    # --- phases -------------------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.schedule.phases[self._phase]

    @property
    def teacher(self) -> Teacher:
        return self._teacher

    def _use_phase(self, phase: Phase) -> None:
        """The objective and the sampler of ``phase`` (the teacher is set by the caller)."""
        self.sampler = dataclasses.replace(self.sampler_template, num_steps=phase.num_steps)
        if phase.kind == "reparam":
            self.objective = SimpleLoss()
        else:
            student, teacher = nested_steps(self.diffusion.num_timesteps, phase.num_steps)
            self.objective = DistillationObjective(self._teacher.denoiser, tuple(student), tuple(teacher))

    def _set_teacher(self, teacher: Teacher) -> None:
        teacher.net.to(self.device)
        if teacher.diffusion is not self.diffusion:
            teacher.diffusion.to(self.device)
        self._teacher = teacher

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "DistillationModule":
        super()._apply(fn, *args, **kwargs)
        teacher = self.__dict__.get("_teacher")
        if teacher is not None:  # the frozen teacher follows the module's device (and dtype) moves
            teacher.net._apply(fn, *args, **kwargs)
            if teacher.diffusion is not self.diffusion:
                teacher.diffusion._apply(fn, *args, **kwargs)
        return self

    def _clock_read(self) -> tuple[float, float]:
        wall, cpu, wall0, cpu0 = self._clock
        return wall + time.perf_counter() - wall0, cpu + time.process_time() - cpu0

    def _clock_reset(self, wall: float = 0.0, cpu: float = 0.0) -> None:
        self._clock = (wall, cpu, time.perf_counter(), time.process_time())

    def _finish_phase(self) -> dict[str, Any]:
        """End of the current phase: its wall/CPU time, and for a round the student file."""
        phase, (wall, cpu) = self.phase, self._clock_read()
        entry: dict[str, Any] = {"phase": phase.kind, "round": phase.round, "num_steps": phase.num_steps,
                                 "teacher_num_steps": 2 * phase.num_steps if phase.kind == "round" else None,
                                 "steps": phase.length, "end_step": phase.end,
                                 "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                                 "teacher": dict(self._teacher.identity)}
        if phase.kind == "round":
            entry |= self._write_student(phase, entry)
        self._students.append(entry)
        self._finished = True
        log.info("%s done at step %d: %.1f s wall, %.1f s CPU (%.1f steps/s)%s", phase.describe(), phase.end, wall, cpu,
                 phase.length / max(wall, 1e-9), f"; student -> {entry['file']}" if "file" in entry else "")
        self._write_report()
        return entry

    def _enter_phase(self, index: int) -> None:
        """From the finished current phase to ``index``: the student restarts from the EMA weights, with a fresh
        Adam state; after a round, that EMA student is the new teacher."""
        if not self._finished:
            self._finish_phase()
        finished, phase = self.phase, self.schedule.phases[index]
        if finished.kind == "round":
            net = copy.deepcopy(self.ema.module).eval().requires_grad_(False)
            written = self._students[-1]
            self._set_teacher(Teacher(net, self.diffusion, {"path": written["file"], "sha256": written["sha256"]}))
        with torch.no_grad():
            torch._foreach_copy_(list(self.net.parameters()) + list(self.net.buffers()),
                                 list(self.ema.module.parameters()) + list(self.ema.module.buffers()))
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        self._phase, self._finished = index, False
        self._use_phase(phase)
        self._clock_reset()
        log.info("%s: step %d to %d, teacher %s", phase.describe(), phase.start, phase.end,
                 self._teacher.identity["path"])

    # --- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        trainer, total = self.trainer, self.schedule.total_steps
        if trainer.max_steps == -1 or trainer.max_steps > total:
            log.info("trainer.max_steps=%s -> %d: the distillation schedule's length (%s)", trainer.max_steps, total,
                     ", ".join(p.describe() for p in self.schedule.phases))
            trainer.fit_loop.epoch_loop.max_steps = total
        elif trainer.max_steps < total:
            log.warning("trainer.max_steps=%d stops the distillation before its end (step %d, in %s); students are "
                        "written for the rounds that finish", trainer.max_steps, total,
                        self.schedule.phase_at(trainer.max_steps - 1).describe())

    def configure_optimizers(self) -> Any:
        optimizers = super().configure_optimizers()
        optimizer = optimizers["optimizer"] if isinstance(optimizers, dict) else optimizers
        self._base_lrs = [group["lr"] for group in optimizer.param_groups]  # the config's, before any resume
        return optimizers

    def on_train_start(self) -> None:
        super().on_train_start()
        wall, cpu, _, _ = self._clock
        self._clock_reset(wall, cpu)  # a resumed phase counts on from its recorded times
        log.info("distillation: %s; the student predicts %s, the teacher %s (%s)",
                 ", ".join(p.describe() for p in self.schedule.phases), self.student_prediction,
                 self.original_teacher.diffusion.prediction_type, self.original_teacher.identity["path"])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        want = self.schedule.phase_at(step).index
        while self._phase < want:  # one at a time: each finished round's student is the next teacher
            self._enter_phase(self._phase + 1)
        phase = self.phase
        lr = self.schedule.lr_factor(step)
        for optimizer in self.trainer.optimizers:
            for group, base in zip(optimizer.param_groups, self._base_lrs or []):
                group["lr"] = (phase.lr if phase.lr is not None else base) * lr

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.phase.end and not self._finished:
            entry = self._finish_phase()
            self.log("distill/phase_wall_s", entry["wall_seconds"])
            self.log("distill/phase_cpu_s", entry["cpu_seconds"])

    def on_train_end(self) -> None:
        if self.global_step == self.phase.end and not self._finished:
            self._finish_phase()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        wall, cpu = self._clock_read()
        checkpoint["diffusion_lab"]["distillation"] = {
            "phase": self._phase, "finished": self._finished, "schedule": self.schedule.record(),
            "student_prediction": self.student_prediction, "teacher": dict(self._teacher.identity),
            "original_teacher": dict(self.original_teacher.identity), "phases_done": copy.deepcopy(self._students),
            "phase_wall_seconds": wall, "phase_cpu_seconds": cpu,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = (checkpoint.get("diffusion_lab") or {}).get("distillation")
        if not isinstance(record, dict):
            raise CheckpointError("ckpt_path is a checkpoint of an ordinary training run, not of a distillation; to "
                                  "distil that model give it as teacher=... and start without ckpt_path")
        ours = self.schedule.record() | {"student_prediction": self.student_prediction}
        theirs = (record.get("schedule") or {}) | {"student_prediction": record.get("student_prediction")}
        changed = [f"model.{k}: {theirs.get(k)} in the checkpoint, {v} now" for k, v in ours.items()
                   if k != "total_steps" and theirs.get(k) != v]
        if changed:
            raise CheckpointError(f"cannot resume this distillation with another schedule ({'; '.join(changed)}); "
                                  "resume with the checkpoint's values (its run folder's config.yaml has them)")
        original = record.get("original_teacher") or {}
        if original.get("sha256") != self.original_teacher.identity["sha256"]:
            raise CheckpointError(f"cannot resume: the checkpoint distils teacher {original.get('path')}, but teacher="
                                  f"{self.original_teacher.identity['path']} is another file (sha256 differs); give "
                                  f"teacher={original.get('path')}")
        # The teacher before the RNG state: building a net draws from the global generator.
        teacher = record["teacher"]
        if teacher.get("sha256") != self.original_teacher.identity["sha256"]:
            loaded = load_teacher(teacher.get("path"), key="the round's teacher")
            if loaded.identity["sha256"] != teacher.get("sha256"):
                raise CheckpointError(f"cannot resume: this round's teacher {teacher.get('path')} changed since the "
                                      "checkpoint was written (sha256 differs); restore that file")
            self._set_teacher(Teacher(loaded.net, self.diffusion, dict(teacher)))
        else:
            self._set_teacher(self.original_teacher)
        self._phase, self._finished = int(record["phase"]), bool(record["finished"])
        self._students = copy.deepcopy(record.get("phases_done") or [])
        self._clock_reset(float(record.get("phase_wall_seconds", 0.0)), float(record.get("phase_cpu_seconds", 0.0)))
        self._use_phase(self.phase)
        super().on_load_checkpoint(checkpoint)

    # --- the students' files -----------------------------------------------------------------------------
    def _folder(self) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(self.trainer.default_root_dir) / "checkpoints"

    def _write_student(self, phase: Phase, entry: dict[str, Any]) -> dict[str, Any]:
        """``student_<N>steps.ckpt``: an ordinary checkpoint of the round's student (raw ``net.*`` and EMA
        ``ema.module.*`` weights, the teacher's model config with this diffusion and an N-step DDIM sampler)."""
        from diffusion_lab.loading import file_sha256
        from diffusion_lab.training.checkpoint_io import save_atomic

        path = self._folder() / STUDENT_FILE.format(phase.num_steps)
        if self.trainer.global_rank != 0:  # rank 0 writes; the others know the name
            return {"file": str(path.resolve()), "sha256": None}
        config = student_config(self.original_teacher.config or {}, self.diffusion, self.sampler,
                                entry | {"file": str(path.resolve()),
                                         "original_teacher": dict(self.original_teacher.identity),
                                         "schedule": self.schedule.record()})
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        checkpoint = {"state_dict": state, "global_step": int(self.global_step), "epoch": int(self.current_epoch),
                      "pytorch-lightning_version": L.__version__,
                      "diffusion_lab": {"config": config, "health": self.health()}}
        save_atomic(checkpoint, path)
        return {"file": str(path.resolve()), "sha256": file_sha256(path)}

    def _write_report(self) -> None:
        """``distillation.json`` beside the students: every finished phase with its times and file."""
        if self.trainer.global_rank != 0:
            return
        from diffusion_lab.utils.io import write_json_atomic

        write_json_atomic(self._folder() / REPORT_FILE, {"schedule": self.schedule.record(),
                                                         "student_prediction": self.student_prediction,
                                                         "original_teacher": self.original_teacher.identity,
                                                         "phases": self._students})


def student_config(teacher_config: dict[str, Any], diffusion: GaussianDiffusion, sampler: DDIMSampler,
                   record: dict[str, Any]) -> dict[str, Any]:
    """A student's run config: the original teacher's, with the student's prediction type, its N-step DDIM sampler
    and the ``distillation`` record (round, steps, teacher, times)."""
    config = copy.deepcopy(teacher_config)
    config["diffusion"] = dict(config["diffusion"]) | {"prediction_type": diffusion.prediction_type}
    config["sampler"] = {"_target_": f"{type(sampler).__module__}.{type(sampler).__qualname__}",
                         **dataclasses.asdict(sampler)}
    config["distillation"] = record
    return config


def _student_diffusion(teacher: Teacher, prediction_type: str) -> GaussianDiffusion:
    from hydra.utils import instantiate

    return instantiate(dict(teacher.config["diffusion"]) | {"prediction_type": prediction_type})


def _check_process(diffusion: GaussianDiffusion | None, student: GaussianDiffusion, prediction_type: str) -> None:
    """The train command's ``diffusion`` must be the teacher's process with the student's prediction type."""
    if diffusion is None:
        return
    if diffusion.num_timesteps != student.num_timesteps or not torch.equal(diffusion.betas.cpu(), student.betas.cpu()):
        raise ConfigError(f"diffusion (schedule={diffusion.schedule}, num_timesteps={diffusion.num_timesteps}) is not "
                          f"the teacher's process (schedule={student.schedule}, "
                          f"num_timesteps={student.num_timesteps}): "
                          f"the students keep the teacher's noise schedule; use diffusion={student.schedule} with its "
                          "values")
    if diffusion.prediction_type != prediction_type:
        raise ConfigError(f"diffusion.prediction_type={diffusion.prediction_type} but model.student_prediction="
                          f"{prediction_type}: the students predict model.student_prediction; leave "
                          "diffusion.prediction_type at ${model.student_prediction} (experiment=distill_digits)")


def _check_sampler(sampler: Any) -> DDIMSampler:
    """The students' sampler (num_steps set per round): deterministic, unclipped DDIM on the trailing spacing."""
    if sampler is None:
        return DDIMSampler(num_steps=1, spacing="trailing", eta=0.0, clip_denoised=False)
    if not isinstance(sampler, DDIMSampler) or sampler.eta != 0 or sampler.spacing != "trailing" \
            or sampler.clip_denoised:
        raise ConfigError(f"sampler ({sampler.config() if hasattr(sampler, 'config') else sampler}): a distilled "
                          "student takes deterministic, unclipped DDIM steps on the trailing spacing (the N-step list "
                          "is every other of the 2N-step list); use sampler=ddim sampler.spacing=trailing "
                          "sampler.eta=0 sampler.clip_denoised=false (experiment=distill_digits)")
    return sampler
