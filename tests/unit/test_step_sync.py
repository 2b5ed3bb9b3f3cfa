"""A training step that a CUDA graph can capture, checked on the CPU.

- No host read of a tensor's value (a device sync on a GPU) in steady-state steps of the real DiffusionModule in a
  real Trainer with the run's own callbacks (progress bar, CSV logger, LR monitor, checkpoints), and the check
  does catch one that is added.
- The net's forward, and the loss's forward and backward through the Denoiser and the objective, compile with
  no graph breaks.
- Compiled training gives the eager losses (every compile mode, channels_last too).
- GroupNorm without layout copies equals torch's; bf16 autocast casts each weight once per step.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from hydra.utils import instantiate
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

from diffusion_lab.callbacks.sync_check import HostReadGuard, SyncCheck
from diffusion_lab.cli import train as train_cli
from diffusion_lab.diffusion.denoiser import Condition, Denoiser
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.losses import objective_for
from diffusion_lab.errors import ConfigError
from diffusion_lab.nets import unet as unet_module
from diffusion_lab.training import module as module_py
from diffusion_lab.training.module import COMPILE_MODES, DiffusionModule, compile_mode
from tests.conftest import TINY, compose_config, fit_steps, tiny_unet, use_run_dir

# The tiny test config with the run's progress bar kept (drawn as a live bar: it redraws every step).
WITH_BAR = [o for o in TINY if "progress_bar" not in o] + ["callbacks.progress_bar.tty=true"]
# The learned-variance, class-conditional, bf16, channels-last corner of the options.
EVERYTHING = ["trainer.precision=bf16-mixed", "model.channels_last=true", "objective=hybrid",
              "diffusion.variance=learned_range", "model.net.num_classes=10", "+model.p_uncond=0.1"]


def train_with(tmp_path: Path, monkeypatch, overrides: list[str], *callbacks: L.Callback) -> dict[str, float]:
    """``diffusion-lab-train`` (the real train(): data, module, the config's callbacks, CSV logger, checkpoint IO)
    with ``callbacks`` added."""
    # all 1,797 digits: 112 steps an epoch (an epoch's end logs, like a logging step); no FID or final grid
    cfg = compose_config("train", WITH_BAR + ["data.limit=null", "callbacks.fid=null",
                                              "callbacks.sample_grid.on_train_end=false", *overrides], hydra=True)
    use_run_dir(cfg, tmp_path / "run", log_dir=tmp_path, data_dir=tmp_path / "data")
    configured = train_cli._instantiate_callbacks
    monkeypatch.setattr(train_cli, "_instantiate_callbacks", lambda c: configured(c) + list(callbacks))
    return train_cli.train(cfg)


# --- no host syncs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [[], EVERYTHING], ids=["default", "bf16-channels_last-hybrid-conditional"])
def test_steady_state_training_steps_read_nothing_on_the_host(tmp_path, monkeypatch, overrides):
    """Steps 3-7 of 10 (logging every 10, at step 9): warm-up (the EMA's first update, the first bar redraw) before
    the window, the logging step after it. Inside it every host read raises."""
    check, casts = SyncCheck(first=3, last=7), CastsInStep(step=8)
    metrics = train_with(tmp_path, monkeypatch, ["trainer.max_steps=10", "trainer.log_every_n_steps=10", *overrides],
                         check, casts)
    assert check.steps_checked == 5 and check.reads == []
    assert math.isfinite(metrics["train/loss"])
    if "trainer.precision=bf16-mixed" in overrides:
        # Lightning's bf16-mixed runs the step under autocast with its weight cache off (cache_enabled=False in
        # lightning/pytorch/plugins/precision/amp.py); one forward per step, so each weight is cast to bf16 once.
        assert casts.autocast == (True, False)
        assert set(casts.casts.values()) == {1} and casts.layer_weights <= set(casts.casts)
    else:
        assert casts.casts == {}


class CastsInStep(L.Callback):
    """Counts the bf16 casts of each of the net's parameters during training step ``step`` (forward, backward,
    clipping, Adam, EMA), and records (autocast on, autocast cache on) as the net's forward sees them."""

    def __init__(self, step: int) -> None:
        self.step, self.casts, self.autocast = step, {}, None
        self.counter: CountCasts | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        names = {p.data_ptr(): n for n, p in pl_module.net.named_parameters()}
        self.names = names
        self.layer_weights = {f"{n}.weight" for n, m in pl_module.net.named_modules()
                              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not n.endswith((".q", ".k", ".v"))}
        pl_module.net.register_forward_pre_hook(self._probe)

    def _probe(self, module, args) -> None:
        self.autocast = (torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled())

    def on_train_batch_start(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            self.counter = CountCasts().__enter__()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.casts = {self.names[p]: n for p, n in self.counter.casts.items() if p in self.names}
            self.counter = None


@pytest.mark.parametrize("sync", ["loss.item() in training_step", "train/loss logged with prog_bar=True"])
def test_the_check_catches_a_sync_added_to_the_step(tmp_path, monkeypatch, sync):
    """The detector is not vacuous: a ``.item()`` in the module, or Lightning's own float conversion of progress-bar
    metrics at every step's end (what ``self.log(..., prog_bar=True)`` did before), stops the run."""
    item = torch.Tensor.item
    if sync.startswith("loss.item"):
        step = DiffusionModule.training_step

        def training_step(self, batch, batch_idx):
            loss = step(self, batch, batch_idx)
            print(f"loss {loss.item():.4f}")
            return loss

        monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    else:
        log = L.LightningModule.log
        monkeypatch.setattr(DiffusionModule, "log", lambda self, name, value, **kw: log(
            self, name, value, **{**kw, "prog_bar": kw.get("prog_bar", False) or name == "train/loss"}))
    with pytest.raises(AssertionError, match=r"read a tensor on the host \(Tensor.item\)"):
        train_with(tmp_path, monkeypatch, ["trainer.max_steps=4", "trainer.log_every_n_steps=10"],
                   SyncCheck(first=2, last=2))
    assert torch.Tensor.item is item  # torch is itself again after the failed run


@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(), lambda x: float(x[0]), lambda x: int(x[0]), lambda x: bool(x[0] > 0),
    lambda x: x.tolist(), lambda x: x.cpu(), lambda x: x.numpy(), lambda x: range(10)[x.long()[0]],
    lambda x: x.nonzero(), lambda x: x[x > 0], lambda x: torch.bincount(x.long().abs()), lambda x: x.unique(),
    lambda x: torch.equal(x, x), lambda x: f"{x[0]}",
], ids=["item", "float", "int", "bool", "tolist", "cpu", "numpy", "index", "nonzero", "mask", "bincount",
        "unique", "equal", "format"])
def test_the_guard_refuses_every_kind_of_host_read_and_restores_torch(read):
    x = torch.randn(8)
    with pytest.raises(AssertionError, match="read a tensor on the host"), HostReadGuard():
        read(x)
    with HostReadGuard():  # on-device arithmetic, views, where, scatter: all fine
        y = torch.where(x > 0, x * 2, x.exp()).view(2, 4).sum(1)
        torch.zeros(4).scatter_add_(0, torch.tensor([0, 1, 1, 3]), x[:4])
    assert read(x) is not None and y.shape == (2,)  # torch is itself again


# --- graph breaks ---------------------------------------------------------------------------------------------
NET = dict(ch_mult=(1, 2), attn_resolutions=(4,))  # two levels and an attention block


def _layout_free_group_norm(monkeypatch) -> None:
    """Run every GroupNorm through group_norm_any_layout (used off the CPU only): its trace, on the CPU."""
    monkeypatch.setattr(unet_module.GroupNorm, "forward", lambda self, x: unet_module.group_norm_any_layout(
        x, self.num_groups, self.weight, self.bias, self.eps))


@pytest.mark.parametrize("variant", ["fp32", "conditional", "bf16-autocast", "channels_last-layout-free-norm"])
def test_the_net_forward_compiles_without_graph_breaks(monkeypatch, variant):
    torch._dynamo.reset()
    net = tiny_unet(num_classes=10 if variant == "conditional" else None, **NET)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    args = (x, t, torch.tensor([0, 3, 10, 9])) if variant == "conditional" else (x, t)
    if variant.startswith("channels_last"):
        _layout_free_group_norm(monkeypatch)
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        args = (x, t)

    def forward(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16-autocast"):
            return net(*a)

    explained = torch._dynamo.explain(forward)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("objective", ["simple", "hybrid", "v-min_snr", "conditional"])
def test_the_loss_forward_and_backward_compile_to_one_graph_each(objective):
    """The whole loss (t and noise drawn, q_sample, the Denoiser's decoding, the objective) under fullgraph=True
    (any graph break raises) and AOT autograd: exactly one forward and one backward graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = {"hybrid": dict(variance="learned_range", loss="hybrid"),
              "v-min_snr": dict(prediction_type="v", loss_weighting="min_snr")}.get(objective, {})
    diffusion = GaussianDiffusion(num_timesteps=1000, **kwargs)
    net = tiny_unet(out_channels=2 if objective == "hybrid" else 1,
                    num_classes=10 if objective == "conditional" else None, perturb=0.05, **NET)
    denoiser, loss_of = Denoiser(net, diffusion), objective_for(diffusion)
    cond = Condition(torch.tensor([0, 3, 10, 9])) if objective == "conditional" else None
    graphs = {"forward": 0, "backward": 0}

    def counting(kind):
        def compiler(gm, example_inputs):
            graphs[kind] += 1
            return make_boxed_func(gm.forward)
        return compiler

    def loss_fn(x0):
        per_example, _ = loss_of(denoiser, x0, cond)
        return per_example.mean()

    compiled = torch.compile(loss_fn, backend=aot_autograd(fw_compiler=counting("forward"),
                                                           bw_compiler=counting("backward")), fullgraph=True)
    loss = compiled(torch.rand(4, 1, 8, 8) * 2 - 1)
    loss.backward()
    assert graphs == {"forward": 1, "backward": 1}
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())


# --- compiled training equals eager ---------------------------------------------------------------------------
class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
        self.values.append(outputs["loss"].item())


def fit_losses(compose_cfg, overrides: list[str], steps: int = 5) -> tuple[DiffusionModule, list[float]]:
    losses = Losses()
    module, _ = fit_steps(compose_cfg, overrides, steps, losses)
    return module, losses.values


@pytest.fixture(scope="module")
def eager_losses():
    return {}


@pytest.mark.parametrize("mode, channels_last", [("default", False), ("reduce-overhead", False), ("default", True)])
def test_compiled_training_gives_the_eager_losses(compose_cfg, monkeypatch, eager_losses, mode, channels_last):
    """5 training steps (dropout on, clipping, fused Adam, EMA), compiled vs eager from the same seed.

    The backend is AOT autograd without inductor (``aot_eager``): Dynamo's capture and AOT's forward/backward split
    are what the module's compile adds on top of the eager maths, and inductor's C++ compile of this net takes
    over a minute on a 2-core CPU (tests/integration/test_speed_paths.py runs it for 2 steps). Run once by hand
    (2026-12-04, this 2-core VM, loaded): inductor's default mode with ``torch._inductor.config.fallback_random``
    (dropout through torch's RNG; inductor's own RNG draws other masks) gave the eager losses bit for bit over these
    5 steps; compiling took ~65 s cold, ~7 s from inductor's cache. Tolerance here: 1e-6 relative in the same layout
    (the same kernels in the same order), 1e-4 across layouts (channels_last sums in another order).
    """
    modes = []
    monkeypatch.setattr(module_py, "compile_net", lambda net, m: modes.append(m) or torch.compile(net, backend="aot_eager"))
    if "eager" not in eager_losses:
        eager_losses["eager"] = fit_losses(compose_cfg, [])[1]
    torch._dynamo.reset()
    module, losses = fit_losses(compose_cfg, [f"model.compile={mode}", f"model.channels_last={str(channels_last).lower()}"])
    assert modes == [mode] and module.compile_mode == mode
    assert isinstance(module._train_net, torch._dynamo.eval_frame.OptimizedModule)
    assert losses == pytest.approx(eager_losses["eager"], rel=1e-4 if channels_last else 1e-6)
    assert not any("_orig_mod" in key for key in module.state_dict())


def test_compile_modes_and_their_errors(monkeypatch):
    assert [compile_mode(m) for m in COMPILE_MODES] == [None, "default", "default", "max-autotune-no-cudagraphs",
                                                         "reduce-overhead"]
    assert compile_mode(None) is None  # as false
    for bad in ("fast", "max-autotune", 1, "True"):
        with pytest.raises(ConfigError, match=r"model.compile=.* is not allowed; allowed values: false, true, "
                                              r"default, max-autotune-no-cudagraphs, reduce-overhead"):
            compile_mode(bad)
    net = tiny_unet()
    with pytest.raises(ConfigError, match="model.compile='fast'"):
        DiffusionModule(net, GaussianDiffusion(num_timesteps=10), optimizer=torch.optim.Adam, compile="fast")
    # A checkpoint written before modes existed says compile: true: the default mode. Each mode reaches torch.compile.
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: calls.append((model, mode)) or model)
    for given, mode in [(True, "default"), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
                        ("reduce-overhead", "reduce-overhead"), (False, None)]:
        module = DiffusionModule(net, GaussianDiffusion(num_timesteps=10), optimizer=torch.optim.Adam, compile=given)
        assert module.compile_mode == mode
    assert calls == [(net, "default"), (net, "max-autotune-no-cudagraphs"), (net, "reduce-overhead")]


def test_capturable_adam_only_where_cuda_graphs_can_capture_it(compose_cfg):
    """model.optimizer.capturable=null: off on the CPU (no capturable Adam there), whatever the mode; an explicit
    value passes through."""
    for overrides, expected in [([], False), (["model.compile=reduce-overhead"], False),
                                (["model.optimizer.capturable=false"], False)]:
        cfg = compose_cfg(overrides)
        module = instantiate(cfg.model, _partial_=True)(diffusion=instantiate(cfg.diffusion), sampler=None)
        assert module.configure_optimizers()["optimizer"].defaults["capturable"] is expected


# --- GroupNorm without layout copies; bf16 weight casts ---------------------------------------------------------
def _group_norm_and_grads(fn, dtype: torch.dtype, channels_last: bool) -> list[torch.Tensor]:
    """fn's output and its gradients (input, weight, bias) at fixed float64 data, in ``dtype``, as float64."""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(3, 64, 5, 6, generator=g, dtype=torch.float64) * 3 + 1, *torch.randn(
        2, 64, generator=g, dtype=torch.float64)
    upstream = torch.randn(3, 64, 5, 6, generator=g, dtype=torch.float64)
    x = x.to(dtype).contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x, weight, bias = (t.to(dtype).requires_grad_() for t in (x, weight, bias))
    out = fn(x, 32, weight, bias, 1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    grads = torch.autograd.grad((out * upstream.to(dtype)).sum(), (x, weight, bias))
    return [t.detach().double() for t in (out, *grads)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "channels_last"])
def test_layout_free_group_norm_equals_torchs(channels_last):
    """group_norm_any_layout against F.group_norm, output and gradients (input, weight, bias): float64 to 1e-12;
    float32 output to 1e-6. Float32 gradients differ by up to ~2e-6 relative: sums over B*H*W terms in another
    order, and torch's own float32 kernel is ~1e-5 from the float64 values; so they are compared to 1e-5, and ours
    must be no further from the float64 values than torch's (within 1.5x). A channels-last input gives a
    channels-last output (no layout copy)."""
    ours64, torch64 = (_group_norm_and_grads(fn, torch.float64, channels_last)
                       for fn in (unet_module.group_norm_any_layout, F.group_norm))
    for a, b in zip(ours64, torch64):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ours, torchs = (_group_norm_and_grads(fn, torch.float32, channels_last)
                    for fn in (unet_module.group_norm_any_layout, F.group_norm))
    torch.testing.assert_close(ours[0], torchs[0], rtol=1e-6, atol=1e-6)
    for a, b, truth in zip(ours[1:], torchs[1:], torch64[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (a - truth).abs().max() <= 1.5 * (b - truth).abs().max()


def test_the_unets_group_norm_uses_torchs_kernel_on_the_cpu_and_keeps_channels_last_elsewhere():
    norm = unet_module.GroupNorm(32, 64)
    assert isinstance(norm, torch.nn.GroupNorm) and list(norm.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, norm.eps))  # CPU: torch's own kernel
    # On another device a channels-last input stays channels-last (the meta device stands in for a GPU here).
    meta = unet_module.GroupNorm(32, 64).to("meta")
    assert meta(x.to("meta")).is_contiguous(memory_format=torch.channels_last)


def test_a_unet_with_the_layout_free_norm_computes_the_same(monkeypatch):
    """The whole net, channels-last, in float64 (so that only a wrong formula could differ): to 1e-10."""
    torch.manual_seed(0)
    net = tiny_unet(perturb=0.05, **NET).double().to(memory_format=torch.channels_last).eval()  # eval: no dropout
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (4,))
    reference = net(x, t)
    _layout_free_group_norm(monkeypatch)
    torch.testing.assert_close(net(x, t), reference, rtol=1e-10, atol=1e-10)


class CountCasts(TorchDispatchMode):
    """How often each tensor (by storage) is cast to bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.casts: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
            self.casts[args[0].data_ptr()] = self.casts.get(args[0].data_ptr(), 0) + 1
        return func(*args, **kwargs)


def test_bf16_autocast_casts_each_weight_once_per_step():
    """With autocast's weight cache on (torch's default; Lightning's bf16-mixed turns it off, which costs nothing with
    one forward per step: test above) each fp32 weight is cast to bf16 once per autocast region even when the net
    runs twice, e.g. a method with two forwards per step; the backward reuses the saved casts.
    Not cached: the attention projections, which the net uses as a view (proj_out's (C, C, 1, 1) weight as (C, C))
    or concatenated (q, k, v: a new tensor): one cast per forward (a training step runs one)."""
    torch.manual_seed(0)
    net = tiny_unet(perturb=0.05, **NET)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))
    weights = {p.data_ptr(): name for name, p in net.named_parameters()}
    with CountCasts() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t) + net(x, t)
        out.float().square().mean().backward()
    cast = {weights[ptr]: n for ptr, n in counter.casts.items() if ptr in weights}
    layers = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              and not n.endswith((".q", ".k", ".v"))]
    expected = {f"{n}.{p}": 1 for n in layers for p in ("weight", "bias")}
    expected |= {n: 2 for n in expected if n.endswith(".proj_out.weight")}  # the (C, C) view: once per forward
    assert cast == expected


def test_lightnings_sigterm_broadcast_runs_before_logging_steps_only(compose_cfg):
    """Under DDP Lightning broadcasts rank 0's SIGTERM flag and reads it on the host before every step; the module
    leaves that to the steps before logging steps (every rank alike). Here (one process, where Lightning skips the
    broadcast) the loop's method is called by hand before each step."""
    calls, steps = [], []

    class CallTheBroadcast(L.Callback):
        def on_train_start(self, trainer, pl_module):  # callbacks' hooks run before the module's
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: calls.append(trainer.global_step)

        def on_train_batch_start(self, trainer, pl_module, *args):
            steps.append(trainer.global_step)
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()

    fit_steps(compose_cfg, ["trainer.log_every_n_steps=3"], 7, CallTheBroadcast())
    assert steps == list(range(7)) and calls == [2, 5]  # the logging steps: (step + 1) % 3 == 0
