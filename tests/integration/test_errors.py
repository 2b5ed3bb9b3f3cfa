"""Bad input gets one message naming the problem and the fix, without a traceback (the README's troubleshooting table).

Most cases call the real ``diffusion-lab-train`` entry point in-process (argv patched: Hydra composes, the guard
reports); one runs it as a subprocess to show what a user sees on the terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.errors import CheckpointError
from tests.conftest import TINY


@pytest.fixture
def run_train(monkeypatch, capsys, tmp_path):
    """run_train(*overrides) -> stderr of diffusion-lab-train, which must exit with status 2 and no traceback."""
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_lab.cli import train as cli

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def _run(*args: str) -> str:
        GlobalHydra.instance().clear()
        monkeypatch.setattr(sys, "argv", ["diffusion-lab-train", *args, f"hydra.run.dir={tmp_path / 'run'}",
                                          f"paths.log_dir={tmp_path / 'runs'}"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert "Traceback" not in err
        return err

    yield _run
    GlobalHydra.instance().clear()


def test_a_mistyped_key_names_the_closest_one(run_train):
    err = run_train("trainer.max_step=10")
    assert "error: unknown config key trainer.max_step. Did you mean trainer.max_steps?" in err
    assert "+trainer.max_step=<value>" in err
    assert "Did you mean model.ema_decay?" in run_train("model.ema_decy=0.9")


@pytest.mark.parametrize("value, message", [
    ("abc", "trainer.max_steps='abc' is not an integer; write e.g. trainer.max_steps=10"),
    ("-1", "trainer.max_steps=-1: training needs a positive number of optimizer steps"),
    ("0", "trainer.max_steps=0: training needs a positive number of optimizer steps"),
])
def test_bad_max_steps(run_train, value, message):
    assert message in run_train(f"trainer.max_steps={value}")


def test_a_yaml_syntax_error_names_file_line_and_column(run_train, tmp_path):
    folder = tmp_path / "conf" / "experiment"
    folder.mkdir(parents=True)
    (folder / "mine.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: [1, 2\n")
    err = run_train(f"--config-dir={tmp_path / 'conf'}", "experiment=mine")
    assert f"YAML syntax error in {folder / 'mine.yaml'}: line 3, column 14: while parsing a flow sequence" in err


def bad_files(tmp_path: Path, checkpoint: Path) -> dict[str, tuple[Path, str]]:
    text, noise, cut = tmp_path / "notes.ckpt", tmp_path / "noise.ckpt", tmp_path / "cut.ckpt"
    text.write_text("step,loss\n1,0.5\n")
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    data = checkpoint.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    return {"text": (text, "is a text file"), "random": (noise, "is not a PyTorch checkpoint (unknown bytes)"),
            "truncated": (cut, "is truncated or corrupted")}


@pytest.mark.parametrize("kind", ["text", "random", "truncated"])
def test_unreadable_checkpoints(run_train, tmp_path, digits_checkpoint, kind):
    from diffusion_lab.training.checkpoints import load_checkpoint, load_module

    path, message = bad_files(tmp_path, digits_checkpoint)[kind]
    for load in (load_checkpoint, load_module):  # the library path sample/eval/pipelines go through
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load(path)
    assert f"error: checkpoint {path} {message}" in run_train(*TINY, f"ckpt_path={path}")


def test_resuming_a_different_model_config_names_the_values(run_train, digits_checkpoint):
    err = run_train(*TINY, "model.net.ch=64", "model.net.num_res_blocks=2", f"ckpt_path={digits_checkpoint}")
    assert "it was trained with a different model config" in err
    assert "model.net.ch: 32 in the checkpoint, 64 now" in err
    assert "model.net.num_res_blocks: 1 in the checkpoint, 2 now" in err
    assert "torch.Size" not in err


def test_full_error_switch_shows_the_traceback(monkeypatch, tmp_path):
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_lab.cli import train as cli
    from diffusion_lab.config import ConfigError

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["diffusion-lab-train", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path}"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigError, match="is not an integer"):
        cli.main()
    GlobalHydra.instance().clear()


def test_switching_fid_off_just_works(compose_cfg):
    from diffusion_lab.cli.train import train

    cfg = compose_cfg(["callbacks=eval", "callbacks.fid=null", "trainer.max_steps=2",
                       "callbacks.sample_grid.every_n_steps=0", "callbacks.sample_grid.on_train_end=false"])
    train(cfg)
    assert sorted(p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir()) == ["last.ckpt"]


def test_the_missing_inception_message_names_the_real_keys(tmp_path):
    from diffusion_lab.metrics.extractors import WeightsError, inception_weights_path

    with pytest.raises(WeightsError) as info:
        inception_weights_path(str(tmp_path / "missing.pth"))
    message = str(info.value)
    assert "inception_weights=/path/to/it for diffusion-lab-eval" in message
    assert "callbacks.fid.inception_weights=/path/to/it for diffusion-lab-train" in message
    assert "metrics.inception_weights" not in message


def test_the_terminal_shows_one_line_and_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DIFFUSION_LAB_TRACEBACK")}
    done = subprocess.run([sys.executable, "-m", "diffusion_lab.cli.train", "trainer.max_step=10",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: unknown config key trainer.max_step. Did you mean trainer.max_steps? To add a "
                                   "new key on purpose, write +trainer.max_step=<value> (`diffusion-lab-train --cfg "
                                   "job` prints the whole config).")
