"""Training runs on the real configs with tiny overrides: loss falls, EMA is exact, resume is exact, NaN stops."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion_lab.cli.train import train
from diffusion_lab.training import DiffusionModule, NonFiniteLossError
from diffusion_lab.training.checkpoints import load_checkpoint, load_module
from tests.conftest import poison_loss, tiny_unet


def read_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_short_digits_run_learns_and_writes_its_run_folder(compose_cfg):
    cfg = compose_cfg(
        [
            "trainer.max_steps=150",
            "trainer.log_every_n_steps=10",
            "data.limit=null",
            "data.batch_size=64",
            "callbacks.model_checkpoint.every_n_train_steps=50",
            "callbacks.sample_grid.every_n_steps=75",
        ]
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    losses = read_losses(run)
    first, last = [losses[s] for s in sorted(losses)[:2]], [losses[s] for s in sorted(losses)[-3:]]
    print(f"loss at start {first}, at the end {last}")
    # An untrained eps-predictor scores ~1 (E[eps^2]); after 150 steps on digits it is well below half of that.
    assert min(first) > 0.8 and max(last) < 0.45
    assert (run / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_0000050.ckpt", "step_0000100.ckpt", "step_0000150.ckpt"]
    assert {"step_0000075.png", "step_0000150.png", "last.png"} <= {p.name for p in (run / "samples").iterdir()}
    from PIL import Image

    grid = Image.open(run / "samples" / "last.png")
    assert grid.size[0] >= 2 * 64  # 4 upscaled 8x8 digits, 2 per row
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/loss", "train/loss_q0", "train/loss_q3", "train/grad_norm", "train/lr"):
        assert key in header

    # The checkpoint rebuilds the module with both weight sets; sample() is the sampler on the EMA weights, clamped.
    module = load_module(run / "checkpoints" / "last.ckpt")
    assert not torch.equal(module.ema.module.conv_in.weight, module.net.conv_in.weight)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images = module.sample(4, generator=g())
    raw = module.sampler.sample(module.ema.module.eval(), module.diffusion, (4, 1, 8, 8), generator=g())
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(raw).all()
    torch.testing.assert_close(images, raw.clamp(-1, 1), rtol=0, atol=0)
    # 150 steps leave the EMA (half-life ~140 steps) close to its initialisation: its raw samples leave [-1, 1]
    # (measured max |x| ~ 60-90), so the comparison above really checks the clamp.
    assert raw.abs().max() > 1


class RecordWeights(L.Callback):
    def __init__(self):
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.history.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def tiny_module(decay=0.9, start=0) -> DiffusionModule:
    from functools import partial

    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.samplers import DDIMSampler

    torch.manual_seed(0)
    return DiffusionModule(
        tiny_unet(), GaussianDiffusion(100), partial(torch.optim.Adam, lr=1e-2), sampler=DDIMSampler(num_steps=5),
        ema_decay=decay, ema_start_step=start,
    )


def digits_loader(n=32, batch=8):
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n]).float().div(8).sub(1).unsqueeze(1)
    return torch.utils.data.DataLoader(x, batch_size=batch)


@pytest.mark.parametrize("start", [0, 2])
def test_ema_equals_the_closed_form_average_of_the_recorded_weights(start):
    decay, k = 0.9, 6
    module, recorder = tiny_module(decay, start), RecordWeights()
    trainer = L.Trainer(max_steps=k, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, digits_loader())
    weights = recorder.history
    assert len(weights) == k
    # AveragedModel copies the weights at its first update, then ema <- d * ema + (1 - d) * w.
    # Closed form: ema_k = d^(k-1-s) w_s + sum_{j>s} (1 - d) d^(k-1-j) w_j  (s: first averaged step).
    ema_state = module.ema.module.state_dict()
    for name in ("conv_in.weight", "down.0.blocks.0.conv1.weight", "conv_out.bias"):
        expected = decay ** (k - 1 - start) * weights[start][name]
        for j in range(start + 1, k):
            expected = expected + (1 - decay) * decay ** (k - 1 - j) * weights[j][name]
        torch.testing.assert_close(ema_state[name], expected, atol=1e-6, rtol=1e-5)
        assert not torch.allclose(ema_state[name], weights[-1][name])  # really an average, not a copy
    assert module.ema.n_averaged.item() == k - start


def test_ema_and_raw_weights_are_checkpointed_restored_and_sampling_uses_ema(tmp_path):
    module = tiny_module(0.9)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, digits_loader())
    path = tmp_path / "a.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]  # nothing but tensors and plain values inside
    assert "net.conv_in.weight" in state and "ema.module.conv_in.weight" in state and "ema.n_averaged" in state
    assert not torch.equal(state["net.conv_in.weight"], state["ema.module.conv_in.weight"])

    # Resume: a fresh module picks up both sets of weights and the EMA counter, then keeps averaging.
    resumed = tiny_module(0.9)
    trainer2 = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer2.fit(resumed, digits_loader(), ckpt_path=path)  # max_steps already reached: restore only
    torch.testing.assert_close(resumed.ema.module.state_dict(), module.ema.module.state_dict())
    torch.testing.assert_close(resumed.net.state_dict(), module.net.state_dict())
    assert resumed.ema.n_averaged.item() == 4 and trainer2.global_step == 4

    # sample() draws with the EMA weights: identical to the sampler on ema.module, different from the raw net.
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ema_images = module.sample(3, generator=g())
    sampler = module.sampler
    # (sample() returns images, clamped to [-1, 1]; the sampler itself no longer clips x0 by default)
    direct = sampler.sample(module.ema.module.eval(), module.diffusion, (3, 1, 8, 8), generator=g())
    torch.testing.assert_close(ema_images, direct.clamp(-1, 1))
    assert not torch.allclose(ema_images, module.sample(3, generator=g(), use_ema=False))


def test_resume_continues_exactly(compose_cfg, tmp_path):
    """8 steps in one go == 4 steps, stop, resume for 4 more: the same loss at every step (CPU, deterministic)."""
    common = [
        "trainer.log_every_n_steps=1",
        "trainer.deterministic=true",
        "callbacks.model_checkpoint.every_n_train_steps=4",
        "callbacks.sample_grid.every_n_steps=0",
        "callbacks.sample_grid.on_train_end=false",
        "data.limit=64",
        "data.batch_size=16",  # 4 steps per epoch: the interruption falls on an epoch boundary
    ]
    whole = compose_cfg(common + ["trainer.max_steps=8"], run_dir=tmp_path / "runs" / "digits" / "whole")
    train(whole)
    first = compose_cfg(common + ["trainer.max_steps=4"], run_dir=tmp_path / "runs" / "digits" / "first")
    train(first)
    second = compose_cfg(common + ["trainer.max_steps=8", "ckpt_path=last"], run_dir=tmp_path / "runs" / "digits" / "second")
    train(second)

    expected = read_losses(tmp_path / "runs" / "digits" / "whole")
    got = read_losses(tmp_path / "runs" / "digits" / "first") | read_losses(tmp_path / "runs" / "digits" / "second")
    assert sorted(expected) == sorted(got) == list(range(8))
    for step in range(8):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), f"step {step}"

    a = load_checkpoint(tmp_path / "runs" / "digits" / "whole" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "runs" / "digits" / "second" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for key in ("net.conv_in.weight", "ema.module.conv_in.weight"):
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 8


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(compose_cfg, monkeypatch):
    poison_loss(monkeypatch, at_call=6)
    cfg = compose_cfg(["trainer.max_steps=20", "callbacks.model_checkpoint.every_n_train_steps=4",
                       "callbacks.sample_grid.every_n_steps=0"])
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


def test_ema_under_ddp_with_two_cpu_processes(tmp_path):
    """DDP must neither sync nor wait for the frozen EMA parameters (a reported AveragedModel failure mode)."""
    module = tiny_module(0.9)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, digits_loader(n=32, batch=4))
    # ddp_spawn hands rank 0's final weights back to this process
    assert module.ema.n_averaged.item() == 3
    assert all(not p.requires_grad for p in module.ema.parameters())
    ema, raw = module.ema.module.state_dict(), module.net.state_dict()
    assert all(torch.isfinite(v).all() for v in ema.values())
    assert not torch.equal(ema["conv_in.weight"], raw["conv_in.weight"])
