"""Every config option composes and instantiates; every experiment runs one step; bad keys fail at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

import diffusion_lab
from diffusion_lab.cli.train import train
from diffusion_lab.config import ConfigError, validate_config
from tests.conftest import compose_config

CONF = Path(diffusion_lab.__file__).parent / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_conf_is_shipped_inside_the_package():
    assert (CONF / "train.yaml").is_file()
    assert options("experiment") == ["ddpm_celebahq256", "ddpm_cifar10", "ddpm_lsun_church256", "digits",
                                      "digits_cond", "distill_digits", "iddpm_cifar10"]


@pytest.mark.parametrize("option", options("diffusion"))
def test_diffusion_options(compose_cfg, option):
    cfg = compose_cfg([f"diffusion={option}"])
    diffusion = instantiate(cfg.diffusion)
    assert diffusion.schedule == option and diffusion.betas.shape == (1000,)


@pytest.mark.parametrize("option", options("sampler"))
def test_sampler_options(compose_cfg, option):
    cfg = compose_cfg([f"sampler={option}"])
    sampler = instantiate(cfg.sampler)
    assert sampler.name == option and len(sampler.visited(instantiate(cfg.diffusion))) >= 1


# model option: (its data set, that data's image side, parameters, dropout). The counts are the paper's 35.7M and
# 114M (Ho et al. 2020; 35,746,307 is also the converted original CIFAR-10 checkpoint's) and the digits net's 1.6M.
MODELS = {"unet_256": ("celebahq256", 256, 113_673_219, 0.0), "unet_cifar10": ("cifar10", 32, 35_746_307, 0.1),
          "unet_digits": ("digits", 8, 1_623_169, 0.1)}


@pytest.mark.parametrize("option", [o for o in options("model") if o != "distill"])  # distill: test_distill.py
def test_model_options(compose_cfg, option):
    data, image_size, parameters, dropout = MODELS[option]
    cfg = compose_cfg([f"model={option}", f"data={data}"], tiny=False)
    validate_config(cfg)
    module = instantiate(cfg.model, _partial_=True)(diffusion=instantiate(cfg.diffusion), sampler=None)
    assert (module.net.config.image_size, module.net.config.dropout) == (image_size, dropout)
    assert sum(p.numel() for p in module.net.parameters()) == parameters


@pytest.mark.parametrize("option", options("data"))
def test_data_options(compose_cfg, option, tmp_path):
    overrides = [f"data={option}"]
    if option == "hf":
        overrides.append("data.source.path=uoft-cs/cifar10")
    if option == "folder":
        overrides.append(f"data.source.root={tmp_path}")
    datamodule = instantiate(compose_cfg(overrides).data)  # builds; loading (network for hub sets) is tested elsewhere
    assert datamodule.image_shape[0] in (1, 3)


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(compose_cfg, option):
    cfg = compose_cfg([f"trainer={option}"])
    validate_config(cfg)
    if option in ("cpu", "default"):
        trainer = instantiate(cfg.trainer, logger=False)
        # the default experiment's (digits) 2,000 steps, the recipe its quality-gate bands hold for; the DDPM
        # recipe's global-norm clipping at 1.0 (paper-numbers.md); full precision
        assert (trainer.max_steps, trainer.gradient_clip_val, trainer.precision) == (2000, 1.0, "32-true")
    else:  # GPU configs: assert the resolved values (no GPU here to instantiate on)
        assert cfg.trainer.accelerator == "gpu"
        assert {"bf16": "bf16-mixed"}.get(option, "32-true") == cfg.trainer.precision


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(compose_cfg, option):
    cfg = compose_cfg([f"logger={option}"])
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert len(loggers) == 1
    if option == "wandb":
        assert cfg.logger.wandb.offline is True  # works with no network unless the user opts in


def test_several_loggers_at_once(compose_cfg):
    cfg = compose_cfg(["logger=[csv,tensorboard]"])
    assert set(cfg.logger) == {"csv", "tensorboard"}


def test_callbacks_and_debug_options(compose_cfg):
    cfg = compose_cfg(["debug=overfit"])
    assert cfg.trainer.overfit_batches == 1
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"ModelCheckpoint", "SampleGrid", "LearningRateMonitor"}


def stand_in(option: str, tmp_path: Path, request: pytest.FixtureRequest) -> list[str]:
    """Local data of the same form as each experiment's hub data set (no network); a teacher to distil."""
    import datasets

    from tests.conftest import make_images

    if option in ("digits", "digits_cond"):  # their runs evaluate FID at the end: keep that small too
        return ["callbacks.fid.num_samples=32", "callbacks.fid.batch_size=32"]
    if option == "distill_digits":
        return [f"teacher={request.getfixturevalue('digits_checkpoint')}"]
    size, column = ((32, 32), "img") if option in ("ddpm_cifar10", "iddpm_cifar10") else ((300, 270), "image")
    features = datasets.Features({column: datasets.Image()})
    path = tmp_path / f"{option}_local"
    datasets.Dataset.from_dict({column: make_images(4, size)}, features=features).save_to_disk(str(path))
    return [f"data.source.path={path}", "data.batch_size=1", "data.num_workers=0", "data.pin_memory=false"]


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_runs_one_training_step(compose_cfg, option, tmp_path, request):
    overrides = [f"experiment={option}", "debug=fdr", "trainer=cpu", "~callbacks.progress_bar",
                 "~callbacks.model_summary", "trainer.enable_model_summary=false"]
    cfg = compose_cfg(overrides + stand_in(option, tmp_path, request), tiny=False)
    metrics = train(cfg)
    assert metrics["train/loss"] > 0


def test_cifar10_experiment_is_the_paper_recipe(compose_cfg):
    """The numbers of Ho et al. 2020, App. B and scripts/run_cifar.py (shared/reference/paper-numbers.md)."""
    cfg = compose_cfg(["experiment=ddpm_cifar10"], tiny=False)
    assert cfg.data.batch_size == 128 and cfg.data.hflip is True
    assert (cfg.diffusion.schedule, cfg.diffusion.num_timesteps) == ("linear", 1000)
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1e-4, 0.02)
    net = cfg.model.net
    assert (net.ch, list(net.ch_mult), net.num_res_blocks, list(net.attn_resolutions), net.dropout) == (
        128, [1, 2, 2, 2], 2, [16], 0.1)
    assert cfg.model.optimizer.lr == 2e-4 and list(cfg.model.optimizer.betas) == [0.9, 0.999]
    assert cfg.model.optimizer.weight_decay == 0.0 and cfg.diffusion.loss == "simple"
    assert cfg.model.lr_scheduler.warmup_steps == 5000 and cfg.model.ema_decay == 0.9999
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.max_steps == 800_000
    assert cfg.sampler.variance == "fixed_large" and cfg.sampler.num_steps is None  # None: all T = 1000 steps


@pytest.mark.parametrize("experiment, steps", [("ddpm_celebahq256", 500_000), ("ddpm_lsun_church256", 1_200_000)])
def test_256_experiments_are_the_paper_recipes(compose_cfg, experiment, steps):
    """The 256x256 models of Ho et al. 2020 (paper-numbers.md): ch_mult (1,1,2,2,4,4), attention at 16x16, no
    dropout, lr 2e-5, batch 64, hflip; 0.5M steps on CelebA-HQ, 1.2M on LSUN Church."""
    cfg = compose_cfg([f"experiment={experiment}"], tiny=False)
    net = cfg.model.net
    assert (net.image_size, net.ch, list(net.ch_mult), net.num_res_blocks, list(net.attn_resolutions), net.dropout) == (
        256, 128, [1, 1, 2, 2, 4, 4], 2, [16], 0.0)
    assert (cfg.data.batch_size, cfg.data.hflip, cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay) == (
        64, True, 2e-5, 0.0)
    assert (cfg.diffusion.schedule, cfg.diffusion.num_timesteps) == ("linear", 1000)
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1e-4, 0.02)
    assert cfg.model.lr_scheduler.warmup_steps == 5000 and cfg.model.ema_decay == 0.9999
    assert cfg.trainer.gradient_clip_val == 1.0 and cfg.trainer.max_steps == steps


def test_iddpm_cifar10_experiment_is_the_improved_ddpm_recipe(compose_cfg):
    cfg = compose_cfg(["experiment=iddpm_cifar10"], tiny=False)
    validate_config(cfg)
    d = cfg.diffusion
    assert (d.schedule, d.num_timesteps, d.variance, d.loss) == ("cosine", 4000, "learned_range", "hybrid")
    net = cfg.model.net
    assert (net.ch, list(net.ch_mult), net.num_res_blocks, list(net.attn_resolutions), net.dropout) == (
        128, [1, 2, 2, 2], 3, [16, 8], 0.3)
    assert net.out_channels == 6  # eps and v for 3 channels, from the ${net_out_channels:...} resolver
    assert cfg.model.optimizer.lr == 1e-4 and cfg.data.batch_size == 128 and cfg.trainer.max_steps == 500_000
    assert cfg.sampler.variance == "learned_range"


def test_learned_variance_doubles_the_output_channels_and_a_mismatch_fails_at_start_up(compose_cfg):
    cfg = compose_cfg(["diffusion.variance=learned_range", "diffusion.loss=hybrid"])
    validate_config(cfg)
    assert cfg.model.net.out_channels == 2 and cfg.data.quantization_levels == 17
    assert cfg.diffusion.quantization_levels == 17
    assert compose_cfg([]).model.net.out_channels == 1
    bad = compose_cfg(["diffusion.variance=learned_range", "diffusion.loss=hybrid", "model.net.out_channels=1"])
    with pytest.raises(ConfigError, match="model.net.out_channels=1 but data.channels=1 with "
                                          "diffusion.variance=learned_range needs 2"):
        validate_config(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("diffusion.schedule=cosin", "diffusion.schedule='cosin' is not allowed; allowed values: linear, cosine"),
        ("sampler.spacing=even", "sampler.spacing='even' is not allowed; allowed values: uniform, leading"),
        ("data.channels=4", "data.channels=4 is not allowed; allowed values: 1, 3"),
        ("diffusion.loss=elbo", "diffusion.loss='elbo' is not allowed; allowed values: simple, vlb, hybrid"),
        ("diffusion.variance=learned", "diffusion.variance='learned' is not allowed; allowed values: fixed_large"),
        ("+trainer.max_step=10", "unknown key trainer.max_step .*Did you mean trainer.max_steps"),
        ("+model.net.chmult=[1]", "unknown key model.net.chmult .*Did you mean model.net.ch_mult"),
        ("model.compile=fast", "model.compile='fast' is not allowed; allowed values: false, true, default, "
                               "max-autotune-no-cudagraphs, reduce-overhead"),
    ],
)
def test_bad_keys_and_values_fail_at_start_up(compose_cfg, override, message):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_cli_rejects_an_unknown_key_and_shows_the_recipe(tmp_path):
    exe = [sys.executable, "-m", "diffusion_lab.cli.train"]
    bad = subprocess.run(exe + ["trainer.max_step=10"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "max_step" in bad.stderr
    job = subprocess.run(exe + ["experiment=ddpm_cifar10", "--cfg", "job"], capture_output=True, text=True, cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    assert "uoft-cs/cifar10" in job.stdout and "warmup_steps: 5000" in job.stdout and "ema_decay: 0.9999" in job.stdout
    assert not (tmp_path / "runs").exists()  # --cfg only prints


def test_sample_and_eval_defaults_are_the_papers_protocols():
    """diffusion-lab-sample draws with Ho et al.'s Algorithm 2 as run for CIFAR-10 (all T steps, sigma_t^2 = beta_t);
    diffusion-lab-eval's default grid has the rows and columns of DDIM's Table 1 (reports/paper.py, which the
    report puts beside it), S = T written as null in the rows that have it."""
    from diffusion_lab.cli.evaluate import grid
    from diffusion_lab.diffusion import GaussianDiffusion
    from diffusion_lab.reports.paper import DDIM_TABLE1_CIFAR10

    sample = compose_config("sample", ["ckpt=model.ckpt"])
    assert sample.sampler._target_ == "diffusion_lab.samplers.DDPMSampler"
    assert (sample.sampler.num_steps, sample.sampler.variance, sample.use_ema) == (None, "fixed_large", True)
    cells = [s.config() for s in grid(compose_config("eval"), GaussianDiffusion(1000))]
    for match, table in DDIM_TABLE1_CIFAR10:
        steps = [c["num_steps"] for c in cells if all(c[k] == v for k, v in match.items())]
        # S = T only where the paper's conclusion rests on it (DDIM eta = 0, DDPM): 1000 NFE per image each
        full = match.get("eta", 0.0) == 0.0
        assert steps == (sorted(table) if full else [s for s in sorted(table) if s < 1000]), match
    # the table's sigma-hat row is DDPM with fixed_large; fixed_small is the variance diffusers defaults to
    assert [c["num_steps"] for c in cells if c.get("variance") == "fixed_small"] == [10, 20, 50, 100, 1000]
    assert [c["num_steps"] for c in cells if c["name"] == "dpm_solver"] == [10, 20]
