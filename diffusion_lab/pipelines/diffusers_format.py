"""Reading and writing the diffusers folder layout, so that checkpoints move both ways between the projects.

A pipeline folder (``save_pretrained`` / ``from_pretrained``) holds::

    model_index.json                       {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json                       a UNet2DModel config
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json        a DDPMScheduler / DDIMScheduler config

This is the layout of the converted original DDPM checkpoints (``google/ddpm-cifar10-32``). The DDPM U-Net is
a UNet2DModel with ``DownBlock2D``/``AttnDownBlock2D`` blocks, ``freq_shift=1``, ``flip_sin_to_cos=False``,
``downsample_padding=0`` and single-head attention; weights map one to one (attention projections are 1x1
convolutions here and linear layers there). Written by hand because that mapping is this project's own;
diffusers itself is not needed to read or write the folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffusion_lab.errors import UserError
from diffusion_lab.nets.unet import AttnBlock, UNet, UNetConfig

DIFFUSERS_VERSION = "0.30.0"  # the format version written into the JSON files
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"


class FormatError(UserError, ValueError):
    """A diffusers folder or config this project cannot represent; the message names the field."""


# --- UNet config ---------------------------------------------------------------------------------------
def unet_to_diffusers_config(cfg: UNetConfig) -> dict[str, Any]:
    if cfg.num_heads != 1:
        raise FormatError("only single-head attention (model.net.num_heads=1) maps onto UNet2DModel's DDPM layout")
    if not cfg.resamp_with_conv:
        raise FormatError("UNet2DModel always resamples with convolutions; model.net.resamp_with_conv must be true")
    attn = [r in cfg.attn_resolutions for r in cfg.resolutions]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": cfg.downsample_padding,
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "dropout": cfg.dropout,
    }


def unet_from_diffusers_config(config: dict[str, Any]) -> UNetConfig:
    def require(key: str, allowed: tuple, default: Any = None) -> Any:
        value = config.get(key, default)
        if value not in allowed:
            raise FormatError(f"unet/config.json: {key}={value!r} is not supported; supported: {list(allowed)}")
        return value

    require("time_embedding_type", ("positional",), "positional")
    require("freq_shift", (1,), 0)
    require("flip_sin_to_cos", (False,), True)
    require("act_fn", ("silu", "swish"), "silu")
    require("center_input_sample", (False,), False)
    require("mid_block_scale_factor", (1, 1.0), 1)
    require("resnet_time_scale_shift", ("default",), "default")
    require("add_attention", (True,), True)
    require("class_embed_type", (None,), None)
    require("num_class_embeds", (None,), None)
    down, up = config["down_block_types"], config["up_block_types"]
    for name in down:
        if name not in ("DownBlock2D", "AttnDownBlock2D"):
            raise FormatError(f"unet/config.json: down block {name!r} is not supported; supported: DownBlock2D, "
                              "AttnDownBlock2D")
    attn = [name == "AttnDownBlock2D" for name in down]
    if [name == "AttnUpBlock2D" for name in reversed(up)] != attn:
        raise FormatError(f"unet/config.json: up_block_types {up} do not mirror down_block_types {down}")
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise FormatError(f"unet/config.json: block_out_channels {widths} are not multiples of the first")
    head_dim = config.get("attention_head_dim")
    if head_dim is not None and any(a and w != head_dim for a, w in zip(attn, widths)):
        raise FormatError("unet/config.json: multi-head attention (attention_head_dim < width) is not supported")
    size = config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    resolutions = [size // 2**i for i in range(len(widths))]
    return UNetConfig(
        image_size=size,
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=tuple(r for r, a in zip(resolutions, attn) if a),
        dropout=config.get("dropout", 0.0),
        downsample_padding=config.get("downsample_padding", 1),
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
    )


# --- weights -----------------------------------------------------------------------------------------
def _key_map(net: UNet) -> dict[str, str]:
    """Our parameter-name prefix -> diffusers' prefix, built by walking the same structure."""
    pairs = {"conv_in": "conv_in", "temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2",
             "norm_out": "conv_norm_out", "conv_out": "conv_out"}

    def resblock(ours: str, theirs: str) -> None:
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("skip", "conv_shortcut")):
            pairs[f"{ours}.{a}"] = f"{theirs}.{b}"

    def attnblock(ours: str, theirs: str) -> None:
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            pairs[f"{ours}.{a}"] = f"{theirs}.{b}"

    for direction, stages in (("down", net.down), ("up", net.up)):
        for i, stage in enumerate(stages):
            for j, attn in enumerate(stage.attns):
                resblock(f"{direction}.{i}.blocks.{j}", f"{direction}_blocks.{i}.resnets.{j}")
                if isinstance(attn, AttnBlock):
                    attnblock(f"{direction}.{i}.attns.{j}", f"{direction}_blocks.{i}.attentions.{j}")
            if direction == "down" and stage.downsample is not None:
                pairs[f"down.{i}.downsample.conv"] = f"down_blocks.{i}.downsamplers.0.conv"
            if direction == "up" and stage.upsample is not None:
                pairs[f"up.{i}.upsample.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    resblock("mid_block1", "mid_block.resnets.0")
    resblock("mid_block2", "mid_block.resnets.1")
    attnblock("mid_attn", "mid_block.attentions.0")
    return pairs


def _is_attention_projection(name: str) -> bool:
    return name.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and name.endswith("weight")


def state_dict_to_diffusers(net: UNet) -> dict[str, torch.Tensor]:
    mapping, out = _key_map(net), {}
    for name, value in net.state_dict().items():
        prefix, leaf = name.rsplit(".", 1)
        if prefix not in mapping:
            raise FormatError(f"no diffusers name for parameter {name}")
        if _is_attention_projection(name):
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[f"{mapping[prefix]}.{leaf}"] = value.detach().contiguous()
    return out


def state_dict_from_diffusers(net: UNet, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapping, out = _key_map(net), {}
    expected = net.state_dict()
    for name, ref in expected.items():
        prefix, leaf = name.rsplit(".", 1)
        key = f"{mapping[prefix]}.{leaf}"
        if key not in weights:
            raise FormatError(f"the diffusers weights have no {key} (needed for {name})")
        value = weights[key]
        if _is_attention_projection(name) and value.ndim == 2:
            value = value[:, :, None, None]
        if value.shape != ref.shape:
            raise FormatError(f"{key}: shape {tuple(value.shape)} in the file, {tuple(ref.shape)} expected")
        out[name] = value
    extra = set(weights) - {f"{mapping[n.rsplit('.', 1)[0]]}.{n.rsplit('.', 1)[1]}" for n in expected}
    if extra:
        raise FormatError(f"the diffusers weights have entries this U-Net does not: {sorted(extra)[:5]}")
    return out


def save_unet(net: UNet, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(unet_to_diffusers_config(net.config), indent=2) + "\n")
    save_file(state_dict_to_diffusers(net), str(folder / WEIGHTS_NAME))


def load_unet(folder: str | Path) -> UNet:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FormatError(f"{config_path} not found: not a diffusers UNet2DModel folder")
    cfg = unet_from_diffusers_config(json.loads(config_path.read_text()))
    with torch.device("meta"):
        net = UNet(**vars(cfg))
    if (folder / WEIGHTS_NAME).is_file():
        weights = load_file(str(folder / WEIGHTS_NAME))
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        weights = torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FormatError(f"no {WEIGHTS_NAME} or {LEGACY_WEIGHTS_NAME} in {folder}")
    net.load_state_dict(state_dict_from_diffusers(net, weights), assign=True)
    return net.eval()
