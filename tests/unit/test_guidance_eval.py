"""The evaluation grid's guidance axis (issue 18): its checks, the label draw, and how the report lays it out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.cli.evaluate import cell_key, guidance_axis
from diffusion_lab.diffusion.denoiser import Condition, check_guidance_scale, uniform_labels
from diffusion_lab.errors import ConfigError
from diffusion_lab.metrics.fidelity import class_accuracy
from diffusion_lab.reports.fid_report import markdown


def cfg(scales):
    return OmegaConf.create({"grid": {"guidance_scale": scales}})


def net(num_classes):
    return SimpleNamespace(config=SimpleNamespace(in_channels=1, out_channels=1, image_size=8, num_classes=num_classes))


def test_the_guidance_axis_is_checked_before_any_work():
    assert guidance_axis(cfg([1, 1.5, 2])) == [1.0, 1.5, 2.0]
    assert guidance_axis(cfg([1.0]), net(None)) == [1.0]  # unconditional checkpoints: the default grid as before
    with pytest.raises(ConfigError, match=r"grid.guidance_scale=\[1, 2\] needs a class-conditional model"):
        guidance_axis(cfg([1, 2]), net(None))
    with pytest.raises(ConfigError, match=r"grid.guidance_scale=-1.0: needs a number >= 0"):
        guidance_axis(cfg([1, -1.0]))
    with pytest.raises(ConfigError, match=r"grid.guidance_scale=\[\]: give at least one scale"):
        guidance_axis(cfg([]))
    with pytest.raises(ConfigError, match="listed twice"):
        guidance_axis(cfg([2, 2.0]))


def test_one_guidance_check_everywhere():
    assert check_guidance_scale(3) == 3.0 and isinstance(check_guidance_scale(3), float)
    for bad in (True, "2", -0.5, float("nan"), None):
        with pytest.raises(ConfigError, match="needs a number >= 0"):
            check_guidance_scale(bad)
    with pytest.raises(ConfigError, match="needs a number >= 0"):
        Condition(torch.tensor([0]), -1.0)


def test_labels_for_metrics_are_uniform_and_depend_only_on_the_index():
    labels = uniform_labels(range(1000), 10)
    assert torch.bincount(labels).tolist() == [100] * 10
    assert uniform_labels([13, 2], 10).tolist() == [3, 2]  # image 13 is a 3 in any batch or process
    assert Condition.for_indices(net(10), [4, 11], 2).class_labels.tolist() == [4, 1]
    assert Condition.for_indices(net(None), [4, 11]) is None
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        Condition.for_indices(net(None), [0], 2.0)


def test_class_accuracy_is_the_argmax_agreement():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert class_accuracy(logits, torch.tensor([1, 0, 0, 0])) == 0.75


def test_cells_of_an_older_report_resume_as_guidance_1():
    sampler = {"name": "ddim", "num_steps": 50}
    assert cell_key(sampler, 1) == cell_key(sampler, 1.0) != cell_key(sampler, 2.0)


def _cell(name, steps, w, fid, acc):
    return {"sampler": {"name": name, "num_steps": steps, "eta": 0.0, "spacing": "uniform"}, "guidance_scale": w,
            "class_labels": "uniform: image i is drawn for class i mod 10", "nfe": steps,
            "metrics": {"fid": fid, "fid_std": 0.5, "is": 8.0, "class_accuracy": acc}}


def test_the_report_puts_guidance_1_in_table_1_and_every_scale_in_the_guidance_section():
    report = {"checkpoint": {"path": "x.ckpt", "sha256": "0" * 64}, "num_samples": 100, "seed": 0, "data": "digits",
              "extractor": "digits-classifier", "wall_seconds": 1.0,
              "reference": {"num_images": 1797, "key": {"split": "train"}},
              "cells": [_cell("ddim", 50, 1.0, 4.0, 0.90), _cell("ddim", 50, 3.0, 9.0, 0.99)]}
    text = markdown(report)
    table1, guidance = text.split("## Classifier-free guidance")
    assert "| DDIM eta=0 | 4.00 +- 0.50 |" in table1 and "9.00" not in table1
    assert "| sampler, S \\ w | 1 | 3 |" in guidance
    assert "| DDIM eta=0, 50 | 4.00 +- 0.50 | 9.00 +- 0.50 |" in guidance
    assert "| DDIM eta=0, 50 | 0.900 | 0.990 |" in guidance
    assert "image i is drawn for class i mod 10" in guidance
