"""Progressive distillation runs (experiment=distill_digits) on the tiny digits checkpoint: a round helps, a resume
mid-round is bit-identical, the students load like any checkpoint, and bad configs are refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.cli.guard import describe_user_error
from diffusion_lab.cli.train import train
from diffusion_lab.diffusion.denoiser import Denoiser
from diffusion_lab.loading import load_model
from diffusion_lab.samplers.ddim import DDIMSampler
from diffusion_lab.training.checkpoint_io import load_checkpoint
from tests.conftest import compose_config, eval_command, use_run_dir

QUIET = ["~callbacks.progress_bar", "~callbacks.model_summary", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false"]
# Reparameterisation to v (4 steps), then two rounds of 5 steps: 8 -> 4 -> 2 DDIM steps; phases [0, 4), [4, 9),
# [9, 14); a checkpoint every 3 steps (3, 6, 9, 12): mid-reparam... mid round 1, a round's end, mid round 2.
SMALL = ["experiment=distill_digits", "model.start_steps=8", "model.end_steps=2", "model.steps_per_round=5",
         "model.reparam_steps=4", "data.limit=64", "data.batch_size=16", "callbacks.sample_grid.num_images=4",
         "callbacks.model_checkpoint.every_n_train_steps=3", *QUIET]


def run(overrides: list[str], run_dir: Path) -> Path:
    cfg = compose_config("train", overrides, hydra=True)
    train(use_run_dir(cfg, run_dir, log_dir=run_dir.parent, data_dir=run_dir.parent / "data"))
    return run_dir / "checkpoints"


def user_error(overrides: list[str], run_dir: Path) -> str:
    """The one-line message diffusion-lab-train would print (the guard's), from an in-process run."""
    with pytest.raises(Exception) as info:
        run(overrides, run_dir)
    message = describe_user_error(info.value)
    assert message is not None, f"not a user error: {info.value!r}"
    return message


@pytest.fixture(scope="module")
def distilled(digits_checkpoint, tmp_path_factory) -> Path:
    """The uninterrupted 14-step run: its checkpoints folder."""
    return run(SMALL + [f"teacher={digits_checkpoint}"], tmp_path_factory.mktemp("distill") / "whole")


def one_vs_two_step_mismatch(teacher_path: Path, student_path: Path, num_steps: int) -> float:
    """Mean squared distance between the student's one DDIM step and the teacher's two, from each state of the
    teacher's own 2N-step trajectory, on held-out noise (seed 123, not a training draw)."""
    teacher, student = load_model(teacher_path), load_model(student_path)
    teacher_den, student_den = Denoiser(teacher.net, teacher.diffusion), Denoiser(student.net, student.diffusion)
    small, big = (DDIMSampler(num_steps=n, spacing="trailing", eta=0.0, clip_denoised=False)
                  for n in (num_steps, 2 * num_steps))
    coarse, fine = small.visited(teacher.diffusion), big.visited(teacher.diffusion)
    z = torch.randn((256, 1, 8, 8), generator=torch.Generator().manual_seed(123))
    total = 0.0
    with torch.no_grad():
        for i, t in enumerate(coarse):
            after = coarse[i + 1] if i + 1 < num_steps else -1
            mid = fine[2 * i + 1]
            two = big.step(teacher_den, big.step(teacher_den, z, t, mid, None), mid, after, None)
            one = small.step(student_den, z, t, after, None)
            total += float(((one - two) ** 2).mean())
            z = two
    return total / num_steps


def test_a_round_makes_one_student_step_match_two_teacher_steps_better(digits_checkpoint, tmp_path):
    """One round 8 -> 4 steps (eps student, as the teacher: no reparameterisation): the student starts as the
    teacher, so before the round the mismatch is the teacher's own one-step vs two-step gap."""
    folder = run(["experiment=distill_digits", f"teacher={digits_checkpoint}", "model.start_steps=8",
                  "model.end_steps=4", "model.steps_per_round=60", "model.student_prediction=eps",
                  "model.reparam_steps=0", "data.limit=256", "data.batch_size=32",
                  "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false", *QUIET],
                 tmp_path / "runs" / "one_round")
    before = one_vs_two_step_mismatch(digits_checkpoint, digits_checkpoint, 4)
    after = one_vs_two_step_mismatch(digits_checkpoint, folder / "student_004steps.ckpt", 4)
    assert after < 0.5 * before, (before, after)


def test_a_resume_mid_round_gives_bit_identical_weights(digits_checkpoint, distilled, tmp_path):
    """Stop at step 6 (mid round 1), resume to 12 (through the round's end at 9), then resume from the step-12
    (mid round 2: its teacher is round 1's student file) and from the step-9 checkpoints to the end: every student
    and final state is the uninterrupted run's, tensor for tensor (weights, EMA, Adam state).

    The stops are periodic checkpoints, as after a kill. (Raising trainer.max_steps after a run ended at its
    max_steps mid-epoch is another matter: Lightning starts a new epoch then, for any module.)"""
    teacher = [f"teacher={digits_checkpoint}"]
    runs = tmp_path / "runs"
    first = run(SMALL + teacher + ["trainer.max_steps=6"], runs / "first")
    second = run(SMALL + teacher + ["trainer.max_steps=12", f"ckpt_path={first / 'last.ckpt'}"], runs / "second")
    mid = run(SMALL + teacher + [f"ckpt_path={second / 'step_0000012.ckpt'}"], runs / "from12")
    edge = run(SMALL + teacher + [f"ckpt_path={second / 'step_0000009.ckpt'}"], runs / "from9")

    def same(a: Path, b: Path) -> None:
        x, y = load_checkpoint(a), load_checkpoint(b)
        assert x["global_step"] == y["global_step"]
        assert x["state_dict"].keys() == y["state_dict"].keys()
        differ = [k for k in x["state_dict"] if not torch.equal(x["state_dict"][k], y["state_dict"][k])]
        assert not differ, f"{a} vs {b}: {differ[:5]}"
        if "optimizer_states" in x:
            for p, q in zip(x["optimizer_states"][0]["state"].values(), y["optimizer_states"][0]["state"].values()):
                assert all(torch.equal(p[k], q[k]) for k in p), f"{a} vs {b}: Adam state"

    same(distilled / "step_0000012.ckpt", second / "step_0000012.ckpt")
    same(distilled / "student_004steps.ckpt", second / "student_004steps.ckpt")
    for resumed in (mid, edge):
        same(distilled / "last.ckpt", resumed / "last.ckpt")
        same(distilled / "student_002steps.ckpt", resumed / "student_002steps.ckpt")
    same(distilled / "student_004steps.ckpt", edge / "student_004steps.ckpt")  # the edge resume finishes round 1
    record = load_checkpoint(second / "step_0000012.ckpt")["diffusion_lab"]["distillation"]
    assert record["phase"] == 2 and record["teacher"]["path"] == str((second / "student_004steps.ckpt").resolve())
    assert not (mid / "student_004steps.ckpt").exists()  # round 1 was done before step 12


def test_the_students_are_ordinary_checkpoints_with_their_own_ddim(distilled, tmp_path):
    from diffusion_lab.errors import CheckpointError
    from diffusion_lab.pipelines import DDIMPipeline
    from diffusion_lab.training.checkpoints import load_module

    report = json.loads((distilled / "distillation.json").read_text())
    assert [(p["phase"], p["num_steps"], p["steps"]) for p in report["phases"]] == [
        ("reparam", 8, 4), ("round", 4, 5), ("round", 2, 5)]
    assert all(p["wall_seconds"] > 0 and p["cpu_seconds"] > 0 for p in report["phases"])
    for n, round_ in ((4, 1), (2, 2)):
        path = distilled / f"student_{n:03d}steps.ckpt"
        model = load_model(path)
        assert model.sampler == DDIMSampler(num_steps=n, spacing="trailing", eta=0.0, clip_denoised=False)
        assert model.diffusion.prediction_type == "v"
        record = model.config["distillation"]
        assert (record["round"], record["num_steps"], record["teacher_num_steps"]) == (round_, n, 2 * n)
        assert record["file"] == str(path.resolve()) and record["cpu_seconds"] > 0
        state = load_checkpoint(path)["state_dict"]
        assert torch.equal(model.net.conv_in.weight, state["ema.module.conv_in.weight"])  # the EMA student
    with pytest.raises(CheckpointError, match=r"is a distillation run's own checkpoint .*/student_<N>steps\.ckpt$"):
        load_module(distilled / "last.ckpt")

    # the pipelines: N-step trailing DDIM by default, from the checkpoint and from an exported folder
    student = distilled / "student_002steps.ckpt"
    model = load_model(student)
    expected = model.sampler.sample(Denoiser(model.net, model.diffusion), None, (2, 1, 8, 8),
                                    generator=torch.Generator().manual_seed(0))
    expected = (expected / 2 + 0.5).clamp(0, 1)
    pipe = DDIMPipeline.from_checkpoint(student)
    assert (pipe.scheduler.timestep_spacing, pipe.default_num_inference_steps) == ("trailing", 2)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(images, expected, atol=1e-6)
    folder = pipe.save_pretrained(tmp_path / "pipeline")
    again = DDIMPipeline.from_pretrained(folder)
    assert again.scheduler.prediction_type == "v_prediction" and again.scheduler.timestep_spacing == "trailing"
    images = again(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
    assert torch.allclose(images, expected, atol=1e-6)


def test_sample_and_eval_load_a_student(distilled, tmp_path):
    student = distilled / "student_002steps.ckpt"
    out = tmp_path / "samples"
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.sample", f"ckpt={student}", "num_images=4",
                             "batch_size=4", f"out={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "sampling.json").read_text())
    assert record["nfe"] == 2 and record["sampler"]["name"] == "ddim" and record["sampler"]["spacing"] == "trailing"
    assert len(list((out / "images").glob("*.png"))) == 4

    report_dir = tmp_path / "eval"
    args = eval_command(student, report_dir, tmp_path / "data", "num_samples=32", "batch_size=32",
                        "grid.samplers=[{sampler: ddim, spacing: trailing}]", "grid.steps=[2]", "metrics.kid=false",
                        "metrics.prc=false", "metrics.isc_splits=2", "metrics.fid_bootstrap=0")
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cells = json.loads((report_dir / "report.json").read_text())["cells"]
    assert len(cells) == 1 and cells[0]["sampler"]["num_steps"] == 2 and cells[0]["sampler"]["spacing"] == "trailing"
    assert cells[0]["metrics"]["fid"] > 0


def test_a_config_that_cannot_distil_is_refused_by_name(digits_checkpoint, distilled, tmp_path):
    runs = tmp_path / "runs"
    base = ["experiment=distill_digits", *QUIET]
    teacher = f"teacher={digits_checkpoint}"
    assert user_error(base, runs / "a").startswith("teacher is required: the trained checkpoint to distil, e.g. "
                                                   "teacher=runs/digits/<date>_<time>/checkpoints/last.ckpt")
    assert user_error(base + [f"teacher={tmp_path / 'nope.ckpt'}"], runs / "b") == (
        f"teacher={tmp_path / 'nope.ckpt'} does not exist; give a trained checkpoint file, e.g. "
        "teacher=runs/digits/<date>_<time>/checkpoints/last.ckpt")
    run_folder = digits_checkpoint.parent.parent
    assert user_error(base + [f"teacher={run_folder}"], runs / "c") == (
        f"teacher={run_folder} is a folder, not a checkpoint file; give the file, e.g. teacher={digits_checkpoint}")
    assert user_error(base + [teacher, "model.start_steps=48"], runs / "d").startswith(
        "model.start_steps=48 cannot halve to model.end_steps=1 (48 -> 24 -> 12 -> 6 -> 3 -> 1.5)")
    assert user_error(base + [teacher, "model.start_steps=8", "model.end_steps=16"], runs / "e").startswith(
        "model.end_steps=16 is not below model.start_steps=8")
    assert user_error(base + [teacher, "model.start_steps=2048", "model.end_steps=2"], runs / "f") == (
        "model.start_steps=2048 exceeds the 1000 timesteps the teacher was trained with; use model.start_steps <= 1000")
    assert user_error(base + [teacher, "model.reparam_steps=0"], runs / "g").startswith(
        "model.student_prediction=v differs from the teacher's eps: the copied weights must first learn")
    assert user_error(base + [teacher, "+model.objective._target_=diffusion_lab.diffusion.losses.SimpleLoss"],
                      runs / "h").startswith("unknown key model.objective for diffusion_lab.training.distill.")
    assert user_error(base + [teacher, "diffusion=cosine"], runs / "i").startswith(
        "diffusion (schedule=cosine, num_timesteps=1000) is not the teacher's process (schedule=linear")
    assert user_error(base + [teacher, "sampler.spacing=leading"], runs / "j").endswith(
        "use sampler=ddim sampler.spacing=trailing sampler.eta=0 sampler.clip_denoised=false "
        "(experiment=distill_digits)")
    assert user_error(base + [f"teacher={distilled / 'last.ckpt'}"], runs / "k").startswith(
        f"{distilled / 'last.ckpt'} is a distillation run's own checkpoint")
    assert user_error(base + [teacher, f"ckpt_path={digits_checkpoint}"], runs / "l").startswith(
        "ckpt_path is a checkpoint of an ordinary training run, not of a distillation")
    other = tmp_path / "other_teacher.ckpt"  # the same model config, other weights
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    checkpoint["state_dict"]["ema.module.conv_in.bias"] += 1
    torch.save(checkpoint, other)
    assert user_error(SMALL + [f"teacher={other}", f"ckpt_path={distilled / 'step_0000012.ckpt'}"], runs / "m") == (
        f"cannot resume: the checkpoint distils teacher {digits_checkpoint.resolve()}, but "
        f"teacher={other.resolve()} is another file (sha256 differs); give teacher={digits_checkpoint.resolve()}")
    assert user_error(SMALL + [f"teacher={digits_checkpoint}", "model.steps_per_round=6",
                               f"ckpt_path={distilled / 'step_0000012.ckpt'}"], runs / "n") == (
        "cannot resume this distillation with another schedule (model.steps_per_round: 5 in the checkpoint, 6 now); "
        "resume with the checkpoint's values (its run folder's config.yaml has them)")
