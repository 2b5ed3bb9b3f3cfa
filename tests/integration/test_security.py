"""A checkpoint from the internet must not run code: pickles are refused, and so are configs naming foreign targets."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from diffusion_lab.errors import CheckpointError, UserError
from diffusion_lab.training.checkpoints import load_checkpoint, load_module


class MakeDirs:
    """Unpickling this calls os.makedirs(path): the payload a malicious checkpoint would carry."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_pickle_payload_checkpoints_are_refused_without_running_anything(tmp_path):
    marker = tmp_path / "pwned"
    zipped = tmp_path / "payload.ckpt"  # torch.save's zip format, the payload inside the pickle
    torch.save({"state_dict": {}, "x": MakeDirs(marker)}, zipped)
    raw = tmp_path / "payload.pkl"  # a bare pickle renamed .ckpt
    raw.write_bytes(pickle.dumps({"state_dict": {}, "x": MakeDirs(marker)}))
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match=r"refusing to load .*(pickled Python objects \(GLOBAL os.makedirs\)|raw Python pickle)"):
            load_checkpoint(path)
        with pytest.raises(CheckpointError):
            load_module(path)
    assert not marker.exists()
    # The payload is real: the unsafe loader would have run it.
    torch.load(zipped, weights_only=False)
    assert marker.is_dir()


def test_every_checkpoint_training_writes_loads_with_weights_only(digits_checkpoint):
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    assert checkpoint["global_step"] == 60 and checkpoint["diffusion_lab"]["config"]["model"]["_target_"]
    assert "rng_states" in checkpoint and checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    load_module(digits_checkpoint)


def tampered(digits_checkpoint: Path, tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    edit(checkpoint["diffusion_lab"]["config"])
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_config_naming_non_project_targets_is_refused_without_running_anything(digits_checkpoint, tmp_path):
    victim, copy, made = tmp_path / "victim.txt", tmp_path / "copied.txt", tmp_path / "made"
    victim.write_text("secret")

    def foreign(config):
        config["model"]["net"] = {"_target_": "os.makedirs", "name": str(made)}
        config["diffusion"] = {"_target_": "shutil.copyfile", "src": str(victim), "dst": str(copy)}

    path = tampered(digits_checkpoint, tmp_path, foreign)
    with pytest.raises(CheckpointError, match=r"names (model\.net|diffusion)\._target_='(os\.makedirs|shutil\.copyfile)', "
                                              r"which is not one of this project's classes"):
        load_module(path)
    assert not made.exists() and not copy.exists()
    # Hydra itself would have run them (what the allow-list is for).
    from hydra.utils import instantiate

    instantiate({"_target_": "shutil.copyfile", "src": str(victim), "dst": str(copy)})
    assert copy.read_text() == "secret"


@pytest.mark.parametrize("target, key", [
    ("diffusion_lab.utils.io.write_text_atomic", "model.net._target_"),  # this project's, but not a model part
    ("diffusion_lab.nets.UNet", "sampler"),  # fine as a target, but an interpolation elsewhere is refused
])
def test_project_functions_and_interpolations_are_refused_too(digits_checkpoint, tmp_path, target, key):
    written = tmp_path / "written.txt"

    def edit(config):
        if key == "sampler":
            config["sampler"]["num_steps"] = "${oc.env:HOME}"
        else:
            config["model"]["net"] = {"_target_": target, "path": str(written), "text": "x"}

    with pytest.raises(CheckpointError, match="refusing"):
        load_module(tampered(digits_checkpoint, tmp_path, edit))
    assert not written.exists()


def test_user_errors_are_user_errors():
    from diffusion_lab.config import ConfigError
    from diffusion_lab.data.sources import DataError
    from diffusion_lab.metrics.extractors import WeightsError
    from diffusion_lab.pipelines.diffusers_format import FormatError
    from diffusion_lab.training.module import NonFiniteLossError

    for cls in (ConfigError, DataError, FormatError, WeightsError, CheckpointError, NonFiniteLossError):
        assert issubclass(cls, UserError), cls
    assert issubclass(CheckpointError, ValueError) and issubclass(WeightsError, FileNotFoundError)
