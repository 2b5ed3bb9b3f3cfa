"""The GPU speed features exercised on CPU: bf16 autocast, torch.compile, channels_last, fused Adam with
clipping, the periodic finite-loss check; and the benchmarks' documented commands."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from diffusion_lab.training import DiffusionModule, NonFiniteLossError
from tests.conftest import fit_steps, poison_loss

ROOT = Path(__file__).resolve().parents[2]


class Record(L.Callback):
    """Per step: the loss, the dtype of the first convolution's output, and the gradient norm the optimizer saw."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.conv_dtypes: set[torch.dtype] = set()
        self.step_grad_norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.net.conv_in.register_forward_hook(lambda m, i, out: self.conv_dtypes.add(out.dtype))

        def after_step(optimizer, *args) -> None:  # the gradients Adam used (after clipping; Adam leaves them)
            grads = [p.grad for p in pl_module.net.parameters() if p.grad is not None]
            self.step_grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

        trainer.optimizers[0].register_step_post_hook(after_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        self.losses.append(outputs["loss"].item())


def fit(compose_cfg, overrides: list[str], steps: int = 3) -> tuple[DiffusionModule, Record]:
    """A few real training steps of the composed config (data, module and trainer groups), recorded."""
    record = Record()
    module, trainer = fit_steps(compose_cfg, overrides, steps, record)
    assert trainer.global_step == steps
    return module, record


def test_bf16_mixed_runs_under_cpu_autocast_with_fused_adam_and_clipping(compose_cfg):
    module, record = fit(compose_cfg, ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0.01"])
    assert record.conv_dtypes == {torch.bfloat16}  # autocast really ran the convolutions in bf16
    assert all(p.dtype == torch.float32 for p in module.net.parameters())  # weights, Adam and EMA stay fp32
    assert module.optimizers().optimizer.defaults["fused"] is True  # the config's fused Adam, not refused
    # Clipping happened: the gradients Adam saw have global norm 0.01 (the raw ones are ~1 at the start).
    assert record.step_grad_norms == pytest.approx([0.01] * 3, rel=1e-3)
    assert all(torch.isfinite(torch.tensor(record.losses)))


def test_channels_last_runs_and_gives_the_same_losses(compose_cfg):
    reference, base = fit(compose_cfg, [])
    module, nhwc = fit(compose_cfg, ["model.channels_last=true"])
    weight = module.net.down[0].blocks[0].conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert module.ema.module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    # The same maths in another memory layout: the same losses to float32 rounding, step by step.
    assert nhwc.losses == pytest.approx(base.losses, rel=1e-4)
    assert list(module.state_dict()) == list(reference.state_dict())


def test_compile_runs_a_few_steps_with_clean_state_dict_keys(compose_cfg):
    torch._dynamo.reset()
    module, record = fit(compose_cfg, ["model.compile=true"], steps=2)
    assert isinstance(module._train_net, torch._dynamo.eval_frame.OptimizedModule)
    assert all(torch.isfinite(torch.tensor(record.losses)))
    assert not any("_orig_mod" in key for key in module.state_dict())


def test_a_nan_loss_between_logging_steps_still_stops_the_run(compose_cfg, monkeypatch):
    """The finite check is read on logging steps only (no per-step host sync): a NaN at step 2 with logging every
    5 steps stops the run at step 4, naming step 2."""
    calls = poison_loss(monkeypatch, at_call=3)
    with pytest.raises(NonFiniteLossError, match="at step 2 \\(detected at step 4\\)"):
        fit(compose_cfg, ["trainer.log_every_n_steps=5"], steps=10)
    assert calls["n"] == 5


def test_train_throughput_documented_command_runs(monkeypatch, capsys):
    """Issue 13 item 6: the docstring's digits command (synthetic data of the digits' 1x8x8 shape), with Hydra
    overrides after ``--precisions`` that must not be swallowed by it."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments" / "benchmarks"))
    import train_throughput

    rows = train_throughput.main(["--experiment", "digits", "--accelerator", "cpu", "--steps", "2", "--warmup", "1",
                                  "--batch-size", "16", "--precisions", "32-true", "model.net.ch=32",
                                  "model.net.ch_mult=[1,2]"])
    out = capsys.readouterr().out
    assert "overrides model.net.ch=32 model.net.ch_mult=[1,2]" in out
    assert [row["setting"] for row in rows] == ["32-true"]
    assert rows[0]["lightning"] > 0 and rows[0]["plain_loop"] > 0
    assert train_throughput.split_argv(["--precisions", "32-true", "bf16-mixed", "trainer=bf16", "--steps=3"]) == (
        ["--precisions", "32-true", "bf16-mixed", "--steps=3"], ["trainer=bf16"])


def test_unet_vs_diffusers_benchmark_runs_and_records_ratios(monkeypatch, tmp_path, capsys):
    """The benchmark builds diffusers' UNet2DModel from our exported config with our weights (it checks the two
    compute the same function and have the same parameter count) and prints/records the ratios."""
    pytest.importorskip("diffusers")
    monkeypatch.syspath_prepend(str(ROOT / "experiments" / "benchmarks"))
    import unet_vs_diffusers

    out, threads = tmp_path / "record.json", torch.get_num_threads()
    try:
        record = unet_vs_diffusers.main(["--configs", "digits", "--digits-batch", "2", "--rounds", "1", "--warmup",
                                         "0", "--variants", "eager", "channels_last", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins 1 thread; the rest of the session keeps its own
    digits = record["configs"]["digits"]
    assert digits["parameters"] == 1_623_169 and set(digits["networks"]) == {"diffusers", "ours[eager]",
                                                                               "ours[channels_last]"}
    base = digits["networks"]["diffusers"]
    for name in ("ours[eager]", "ours[channels_last]"):  # each ratio is its own median over diffusers', not inverted
        ours = digits["networks"][name]
        assert ours["train_ratio_to_diffusers"] == pytest.approx(ours["train_step_s"] / base["train_step_s"])
        assert ours["forward_ratio_to_diffusers"] == pytest.approx(ours["forward_s"] / base["forward_s"])
        assert ours["train_images_per_s"] == pytest.approx(2 / ours["train_step_s"])  # --digits-batch 2
    assert record["threads"] == 1 and "torch" in record and json.loads(out.read_text()) == record
    assert "ours / diffusers" in capsys.readouterr().out
