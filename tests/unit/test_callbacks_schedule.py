"""The periodic callbacks' schedule (which steps fire), the ETA model (with numbers), the callbacks' argument checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from diffusion_lab.callbacks import BPDEvaluation, FIDEvaluation, SampleGrid, StepProgressBar
from diffusion_lab.callbacks.eta import TRAIN_STEP_EVALUATIONS_PER_IMAGE, SamplingWork, time_left
from diffusion_lab.callbacks.schedule import ScheduledCallback, StepSchedule
from diffusion_lab.errors import ConfigError, UserError


class Recorder(ScheduledCallback):
    """Records (step, at_end) of each run; one run costs 10 evaluations."""

    def __init__(self, every_n_steps: int, at_steps=(), on_train_end: bool = True) -> None:
        super().__init__("callbacks.recorder", every_n_steps, at_steps, on_train_end)
        self.runs: list[tuple[int, bool]] = []

    def fire(self, trainer, pl_module, at_end):
        self.runs.append((trainer.global_step, at_end))

    def evaluations_per_run(self, trainer, pl_module):
        return 10


def train(callback: ScheduledCallback, max_steps: int) -> SimpleNamespace:
    """Lightning's hook order for ``max_steps`` optimizer steps: on_train_batch_end after each, then on_train_end."""
    trainer = SimpleNamespace(global_step=0, global_rank=0, world_size=1)
    for step in range(1, max_steps + 1):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None)
    callback.on_train_end(trainer, None)
    return trainer


def test_every_250_of_1000_with_on_train_end_fires_250_500_750_1000_once():
    callback = Recorder(every_n_steps=250, on_train_end=True)
    assert callback.schedule.remaining_runs(0, 1000) == 4
    train(callback, 1000)
    assert callback.runs == [(250, False), (500, False), (750, False), (1000, False)]  # 1000 not again at the end


def test_a_last_step_off_the_period_gets_its_own_end_run():
    callback = Recorder(every_n_steps=250, on_train_end=True)
    assert callback.schedule.remaining_runs(0, 1100) == 5
    train(callback, 1100)
    assert callback.runs == [(250, False), (500, False), (750, False), (1000, False), (1100, True)]


def test_at_steps_add_early_runs_without_doubling_a_periodic_one():
    callback = Recorder(every_n_steps=500, at_steps=[500, 100, 100], on_train_end=False)
    train(callback, 1200)
    assert callback.runs == [(100, False), (500, False), (1000, False)]


def test_never_and_disabled_fire_nothing():
    never = Recorder(every_n_steps=0, on_train_end=False)
    train(never, 50)
    assert never.runs == [] and never.schedule.remaining_runs(0, 50) == 0
    off = Recorder(every_n_steps=5)
    off.enabled = False
    trainer = train(off, 50)
    assert off.runs == [] and off.remaining_evaluations(trainer, None, 50) == 0


@pytest.mark.parametrize("every, at, end, after, max_steps", [
    (250, [], True, 0, 1000), (250, [], True, 0, 1001), (7, [3, 14, 20], True, 5, 60), (0, [4], True, 4, 30),
    (0, [], True, 29, 30), (10, [], False, 30, 30), (10, [], True, 30, 30), (3, [1, 2], False, 0, 10)])
def test_remaining_runs_counts_what_the_hooks_will_fire(every, at, end, after, max_steps):
    callback = Recorder(every, at, end)
    train(callback, max_steps)
    fired_later = [run for run in callback.runs if run[0] > after or run[1]]
    assert callback.schedule.remaining_runs(after, max_steps) == len(fired_later)
    trainer = SimpleNamespace(global_step=after)
    assert Recorder(every, at, end).remaining_evaluations(trainer, None, max_steps) == 10 * len(fired_later)


# --- the ETA model -------------------------------------------------------------------------------------------
def test_time_left_is_the_closed_form():
    """20 steps in 14 s of which 4 s were sampling: 2 steps/s; 980 steps left; three callbacks' work."""
    work = [SamplingWork("SampleGrid", 4 * 64 * 100),  # not run yet: priced from the training step
            SamplingWork("FIDEvaluation", 2 * 1000 * 50, seconds_per_evaluation=2e-4),
            SamplingWork("BPDEvaluation", 2 * 256 * 1000, seconds_per_evaluation=1e-5)]
    left = time_left(steps=20, seconds=14.0, sampling_seconds=4.0, steps_left=980, work=work, batch_size=128)
    step_seconds = 10.0 / 20
    assert left.steps_per_second == pytest.approx(2.0)
    assert left.training == pytest.approx(980 * step_seconds)
    grid = 4 * 64 * 100 * step_seconds / (TRAIN_STEP_EVALUATIONS_PER_IMAGE * 128)
    assert left.sampling == {"SampleGrid": pytest.approx(grid), "FIDEvaluation": pytest.approx(20.0),
                             "BPDEvaluation": pytest.approx(5.12)}
    assert left.total == pytest.approx(490.0 + grid + 20.0 + 5.12)


def test_time_left_without_a_rate_or_a_price():
    assert time_left(0, 5.0, 0.0, 100) is None  # no step measured yet
    assert time_left(10, 4.0, 4.0, 100) is None  # all the time went to sampling: no training rate
    # An unrun callback without a batch size has no price and is left out; one with nothing left is absent.
    left = time_left(10, 5.0, 0.0, 100, [SamplingWork("SampleGrid", 640), SamplingWork("FIDEvaluation", 0, 1.0)])
    assert left.sampling == {} and left.total == pytest.approx(50.0)


def test_the_eta_counts_the_bits_per_dim_callback(monkeypatch):
    import diffusion_lab.callbacks.progress as progress

    bpd = BPDEvaluation(enabled=True, every_n_steps=500, num_images=256)
    module = SimpleNamespace(diffusion=SimpleNamespace(num_timesteps=1000))
    trainer = SimpleNamespace(global_step=101, global_rank=1, world_size=2, datamodule=SimpleNamespace(batch_size=64),
                              callbacks=[bpd])
    # after step 101 of 1000: steps 500 and 1000, 128 images on this rank, T = 1000 calls each
    assert bpd.remaining_evaluations(trainer, module, 1000) == 2 * 128 * 1000
    bpd.clock.seconds, bpd.clock.evaluations = 3.0, 128 * 1000
    bar = StepProgressBar()
    bar.total, bar._first = 1000.0, (80.0, 1, 0.0)
    monkeypatch.setattr(progress, "perf_counter", lambda: 100.0)
    left = bar.time_left(trainer, module)
    assert left.training == pytest.approx(899 * (20.0 - 3.0) / 100)  # its 3 s are not training time
    assert left.sampling == {"BPDEvaluation": pytest.approx(2 * 3.0)}
    bpd.enabled = False
    assert bar.time_left(trainer, module).sampling == {}


# --- argument checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, start", [
    (lambda: StepSchedule("callbacks.x", -1), "callbacks.x.every_n_steps=-1: must be a whole number >= 0 (0: never)"),
    (lambda: StepSchedule("callbacks.x", 2.5), "callbacks.x.every_n_steps=2.5: must be a whole number"),
    (lambda: SampleGrid("unused", every_n_steps=-1), "callbacks.sample_grid.every_n_steps=-1"),
    (lambda: SampleGrid("unused", at_steps=[0, 5]), "callbacks.sample_grid.at_steps=[0, 5]: [0] are not steps >= 1"),
    (lambda: SampleGrid("unused", num_images=0), "callbacks.sample_grid.num_images=0: must be a whole number >= 1"),
    (lambda: FIDEvaluation("digits", every_n_steps=-10), "callbacks.fid.every_n_steps=-10"),
    (lambda: FIDEvaluation("digits", num_samples=0), "callbacks.fid.num_samples=0"),
    (lambda: BPDEvaluation(every_n_steps=-1), "callbacks.bpd.every_n_steps=-1"),
    (lambda: BPDEvaluation(batch_size=0), "callbacks.bpd.batch_size=0"),
    (lambda: BPDEvaluation(variance="fixed"), "callbacks.bpd.variance='fixed': use one of fixed_large"),
    (lambda: StepProgressBar(estimate_after=-1), "callbacks.progress_bar.estimate_after=-1"),
    (lambda: StepProgressBar(tty="yes"), "callbacks.progress_bar.tty='yes': use true"),
])
def test_bad_callback_arguments_are_config_errors_naming_the_key_and_fix(make, start):
    with pytest.raises(ConfigError) as info:
        make()
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith(start), message
    assert "e.g. " in message or "use " in message or "list " in message  # the fix


@pytest.mark.parametrize("every, at, end, max_steps", [(1000, [500], True, 3000), (1000, [500], True, 2500),
                                                       (1000, [], False, 3000), (0, [3], True, 9)])
def test_the_last_grid_uses_final_sampler_and_the_eta_prices_it(monkeypatch, every, at, end, max_steps):
    """Grids at every periodic step use ``sampler``; the run's last grid (at max_steps, periodic or the end run)
    uses ``final_sampler``. The remaining evaluations are (runs - 1) x the preview's + 1 x the final one's."""
    preview, final = SimpleNamespace(visited=lambda d: list(range(20))), SimpleNamespace(visited=lambda d: list(range(1000)))
    grid = SampleGrid(dirpath="unused", every_n_steps=every, at_steps=at, on_train_end=end, num_images=4,
                      sampler=preview, final_sampler=final)
    module = SimpleNamespace(net=None, sampler=None, diffusion=None)
    drawn: list[tuple[int, int]] = []
    monkeypatch.setattr(SampleGrid, "write", lambda self, trainer, pl_module, final=False: drawn.append(
        (trainer.global_step, len(self.sampler_for(pl_module, final).visited(None)))))
    trainer = SimpleNamespace(global_step=0, global_rank=0, max_steps=max_steps)
    runs = grid.schedule.remaining_runs(0, max_steps)
    has_last = end or grid.schedule.is_due(max_steps)
    expected = 4 * (20 * (runs - 1) + 1000) if has_last else 4 * 20 * runs
    assert grid.remaining_evaluations(trainer, module, max_steps) == expected
    for step in range(1, max_steps + 1):
        trainer.global_step = step
        grid.on_train_batch_end(trainer, module)
    grid.on_train_end(trainer, module)
    assert len(drawn) == runs
    assert [n for s, n in drawn] == [1000 if s == max_steps else 20 for s, _ in drawn]
    assert (drawn[-1] == (max_steps, 1000)) == has_last
