"""Checkpoints written by earlier versions of the code still load and sample the same."""

from __future__ import annotations

from pathlib import Path

import torch


def test_a_checkpoint_written_before_log_betas_still_loads_and_samples_the_same(compose_cfg, tmp_path):
    """Checkpoints of c811e9a lack the ``diffusion.log_betas`` buffer (added with learned variances)."""
    from diffusion_lab.cli.train import train
    from diffusion_lab.loading import load_model
    from diffusion_lab.samplers import DDIMSampler

    cfg = compose_cfg(["trainer.max_steps=2", "callbacks.sample_grid=null"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert "diffusion.log_betas" in state["state_dict"]
    old = dict(state, state_dict={k: v for k, v in state["state_dict"].items() if not k.endswith("log_betas")})
    old_ckpt = tmp_path / "old.ckpt"
    torch.save(old, old_ckpt)
    sampler = DDIMSampler(num_steps=5)
    images = []
    for path in (ckpt, old_ckpt):
        model = load_model(path)
        assert torch.equal(model.diffusion.log_betas, model.diffusion.betas.log())
        images.append(sampler.sample(model.net, model.diffusion, (4, 1, 8, 8), seed=0))
    assert torch.equal(images[0], images[1])
