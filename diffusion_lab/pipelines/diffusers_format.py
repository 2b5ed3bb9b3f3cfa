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

A class-conditional net (``num_classes``) is a UNet2DModel with ``num_class_embeds = num_classes + 1`` and
``class_embed_type: null``: both add ``class_embedding(labels)`` (an ``nn.Embedding`` of the time-embedding width)
to the time embedding after its MLP, and the weights ``class_embedding.weight`` keep their name. The last row is
this project's null class (classifier-free guidance), so a diffusers net with ``num_class_embeds = N`` loads here
as ``num_classes = N - 1``; diffusers needs its labels passed explicitly (the null class is label ``N - 1``).
Unconditional folders carry no class field, as before.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusion_lab.errors import CheckpointNotFoundError, UserError
from diffusion_lab.nets.unet import AttnBlock, UNet, UNetConfig

DIFFUSERS_VERSION = "0.30.0"  # the format version written into the JSON files
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
# safetensors metadata written beside the weights: the image size the net was trained at. The weights of a
# convolutional U-Net do not fix it, so this is how a config.json edited to another sample_size is caught.
TRAINED_SIZE_KEY = "diffusion_lab.sample_size"


class FormatError(UserError, ValueError):
    """A diffusers folder or config this project cannot represent; the message names the field and the fix."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or one FormatError naming the file, the line and the fix."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise FormatError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                          "fix the file, or write the folder again with save_pretrained") from error
    if not isinstance(value, dict):
        raise FormatError(f"{path} holds a JSON {type(value).__name__}, not an object of config fields; "
                          "write the folder again with save_pretrained")
    return value


def refuse_unknown_fields(config: dict[str, Any], known: set[str], source: str, owner: str) -> None:
    """Refuse a field ``owner`` (a diffusers class) does not have.

    diffusers drops such a field with a log line and so would this loader, so the folder would load "fine" in
    both while not being what its author wrote: most often a misspelt field that would change sampling. Fields
    starting with ``_`` are diffusers' own bookkeeping (``_class_name``, ``_diffusers_version``) and pass.
    """
    for key in config:
        if key.startswith("_") or key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FormatError(
            f"{source}: unknown field {key!r}{hint}; {owner} has no such field, so diffusers ignores it and so "
            f"would this project, and the folder would not sample as written. Remove {key!r} from the file"
            + (f" or spell it {close[0]!r}" if close else ""))


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
        # num_classes real classes + the null class; written only for a conditional net (unconditional unchanged)
        **({"class_embed_type": None, "num_class_embeds": cfg.num_classes + 1} if cfg.num_classes is not None else {}),
    }


# UNet2DModel's defaults (diffusers 0.42) for the fields read below: a missing field means what it means there.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "layers_per_block": 2, "downsample_padding": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "dropout": 0.0, "norm_num_groups": 32, "norm_eps": 1e-5,
    "attention_head_dim": 8, "time_embedding_dim": None, "attn_norm_num_groups": None,
    "num_train_timesteps": None,  # used by diffusers only with time_embedding_type="learned"
    "num_class_embeds": None,  # None: unconditional; N: N - 1 classes + this project's null class (the last row)
}
# UNet2DModel fields with the only values this U-Net implements (first: diffusers' default when missing).
UNET_FIXED: dict[str, tuple[Any, tuple]] = {
    "time_embedding_type": ("positional", ("positional",)),
    "freq_shift": (0, (1,)),
    "flip_sin_to_cos": (True, (False,)),
    "act_fn": ("silu", ("silu", "swish")),
    "center_input_sample": (False, (False,)),
    "mid_block_type": ("UNetMidBlock2D", ("UNetMidBlock2D",)),
    "mid_block_scale_factor": (1, (1, 1.0)),
    "downsample_type": ("conv", ("conv",)),
    "upsample_type": ("conv", ("conv",)),
    "resnet_time_scale_shift": ("default", ("default",)),
    "add_attention": (True, (True,)),
    "class_embed_type": (None, (None,)),  # with num_class_embeds: the nn.Embedding class embedding
}


def unet_from_diffusers_config(config: dict[str, Any], source: str = "unet/config.json") -> UNetConfig:
    """The UNetConfig of a UNet2DModel config; every field is read, checked against the one value this U-Net
    implements, or refused (unknown fields too), so nothing that changes the network in diffusers is dropped."""
    refuse_unknown_fields(config, set(UNET_DEFAULTS) | set(UNET_FIXED), source, "UNet2DModel")
    for key, (default, allowed) in UNET_FIXED.items():
        value = config.get(key, default)
        if value not in allowed:
            raise FormatError(f"{source}: {key}={value!r} is not supported: this project's U-Net implements only "
                              f"{key}={json.dumps(allowed[0])} (the DDPM layout), so it cannot run this network")
    get = lambda key: config.get(key, UNET_DEFAULTS[key])  # noqa: E731
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    for name in down:
        if name not in ("DownBlock2D", "AttnDownBlock2D"):
            raise FormatError(f"{source}: down block {name!r} is not supported; supported: DownBlock2D, "
                              "AttnDownBlock2D")
    attn = [name == "AttnDownBlock2D" for name in down]
    if [name == "AttnUpBlock2D" for name in reversed(up)] != attn:
        raise FormatError(f"{source}: up_block_types {up} do not mirror down_block_types {down}; each "
                          "AttnDownBlock2D needs an AttnUpBlock2D at the same resolution (in reverse order)")
    widths = list(get("block_out_channels"))
    if not widths or len(widths) != len(down):
        raise FormatError(f"{source}: block_out_channels {widths} must give one width per down block "
                          f"({len(down)} in down_block_types)")
    ch, groups = widths[0], get("norm_num_groups")
    if any(w % ch or w % groups for w in widths):
        raise FormatError(f"{source}: block_out_channels {widths} must be multiples of the first width and of "
                          f"norm_num_groups={groups}")
    head_dim = get("attention_head_dim")
    attn_widths = sorted({w for a, w in zip(attn, widths) if a} | {widths[-1]})  # the mid block has attention
    if head_dim is not None and any(w != head_dim for w in attn_widths):
        raise FormatError(f"{source}: attention_head_dim={head_dim} splits the attention of width "
                          f"{', '.join(map(str, attn_widths))} into several heads, and this project's U-Net has "
                          "single-head attention only; set \"attention_head_dim\": null if the net was trained "
                          "with one head (a multi-head net cannot be loaded here)")
    if get("time_embedding_dim") not in (None, 4 * ch):
        raise FormatError(f"{source}: time_embedding_dim={get('time_embedding_dim')} is not supported; this U-Net's "
                          f"time embedding is 4 x block_out_channels[0] = {4 * ch} (use null)")
    if get("attn_norm_num_groups") not in (None, groups):
        raise FormatError(f"{source}: attn_norm_num_groups={get('attn_norm_num_groups')} is not supported; the "
                          f"attention blocks normalise with norm_num_groups={groups} (use null)")
    if get("downsample_padding") not in (0, 1):
        raise FormatError(f"{source}: downsample_padding={get('downsample_padding')} is not supported; use 0 or 1")
    size = get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise FormatError(f"{source}: sample_size={size} is not square; this project samples square images: "
                              "give one int")
        size = size[0]
    factor = 2 ** (len(widths) - 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise FormatError(f"{source}: sample_size={size!r} must be the image size the net samples (an int, "
                          "e.g. 32); set it in the file")
    if size % factor:
        near = (size // factor * factor, (size // factor + 1) * factor)
        raise FormatError(f"{source}: sample_size={size} is not divisible by {factor}, the down-sampling factor "
                          f"of the {len(widths)} down blocks; set it to the size the net was trained at, a "
                          f"multiple of {factor} (e.g. {' or '.join(str(n) for n in near if n > 0)})")
    resolutions = [size // 2**i for i in range(len(widths))]
    embeds = get("num_class_embeds")
    if embeds is not None and (isinstance(embeds, bool) or not isinstance(embeds, int) or embeds < 2):
        raise FormatError(f"{source}: num_class_embeds={embeds!r} is not supported; this project's class-conditional "
                          "U-Net has num_classes + 1 class embeddings (the last one the null class), so use an int "
                          ">= 2, or null for an unconditional net")
    try:
        return UNetConfig(
            image_size=size,
            in_channels=get("in_channels"),
            out_channels=get("out_channels"),
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=get("layers_per_block"),
            attn_resolutions=tuple(r for r, a in zip(resolutions, attn) if a),
            dropout=get("dropout"),
            downsample_padding=get("downsample_padding"),
            norm_groups=groups,
            norm_eps=get("norm_eps"),
            num_classes=None if embeds is None else embeds - 1,
        )
    except (TypeError, ValueError) as error:  # any check of UNetConfig's own, in the file's terms
        raise FormatError(f"{source} describes a U-Net this project cannot build: {error}") from error


def attention_sizes(cfg: UNetConfig, size: int | None = None) -> str:
    """'4x4, 2x2': where a net of this config runs self-attention (its attention levels and the middle) when it
    samples ``size`` x ``size`` images (default: its own image size)."""
    size = size or cfg.image_size
    levels = [i for i, r in enumerate(cfg.resolutions) if r in cfg.attn_resolutions] + [len(cfg.resolutions) - 1]
    return ", ".join(f"{r}x{r}" for r in sorted({size // 2**i for i in levels}, reverse=True))


# --- weights -----------------------------------------------------------------------------------------
def _key_map(net: UNet) -> dict[str, str]:
    """Our parameter-name prefix -> diffusers' prefix, built by walking the same structure."""
    pairs = {"conv_in": "conv_in", "temb.0": "time_embedding.linear_1", "temb.2": "time_embedding.linear_2",
             "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    if net.class_embedding is not None:
        pairs["class_embedding"] = "class_embedding"  # the same name and layout (num_classes + 1, 4 * ch)

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
            raise FormatError(f"the diffusers weights have no {key} (needed for {name}): config.json does not "
                              "describe these weights; use the config.json saved with them")
        value = weights[key]
        if _is_attention_projection(name) and value.ndim == 2:
            value = value[:, :, None, None]
        if value.shape != ref.shape:
            raise FormatError(f"{key}: shape {tuple(value.shape)} in the weights, {tuple(ref.shape)} from config.json:"
                              " the config does not describe these weights; use the config.json saved with them")
        out[name] = value
    extra = set(weights) - {f"{mapping[n.rsplit('.', 1)[0]]}.{n.rsplit('.', 1)[1]}" for n in expected}
    if extra:
        raise FormatError(f"the diffusers weights have entries this U-Net does not: {sorted(extra)[:5]}; config.json "
                          "does not describe these weights: use the config.json saved with them")
    return out


def save_unet(net: UNet, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(unet_to_diffusers_config(net.config), indent=2) + "\n")
    metadata = {"format": "pt", TRAINED_SIZE_KEY: str(net.config.image_size)}  # "format": what diffusers writes
    save_file(state_dict_to_diffusers(net), str(folder / WEIGHTS_NAME), metadata=metadata)


def load_unet(folder: str | Path) -> UNet:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        what = "no such folder" if not folder.is_dir() else "no config.json in it"
        raise CheckpointNotFoundError(
            f"{config_path} not found ({what}): a pipeline folder needs unet/config.json and unet/{WEIGHTS_NAME} "
            "(a UNet2DModel); write the folder with save_pretrained")
    cfg = unet_from_diffusers_config(read_json(config_path), str(config_path))
    with torch.device("meta"):
        net = UNet(**vars(cfg))
    metadata: dict[str, str] = {}
    if (folder / WEIGHTS_NAME).is_file():
        weights = load_file(str(folder / WEIGHTS_NAME))
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as f:
            metadata = f.metadata() or {}
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        weights = torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise CheckpointNotFoundError(
            f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {folder}: the U-Net's weights are missing; copy "
            "them from the folder this config.json came from, or write the folder again with save_pretrained")
    check_weights_match_config(weights, metadata, cfg, config_path)
    net.load_state_dict(state_dict_from_diffusers(net, weights), assign=True)
    return net.eval()


def check_weights_match_config(weights: dict[str, torch.Tensor], metadata: dict[str, str], cfg: UNetConfig,
                               config_path: Path) -> None:
    """Name the config field that disagrees with the weights: channels (from conv_in / conv_out) and the size the
    net was trained at (from this project's metadata; a diffusers-written file has none, so it is not checked)."""
    for field, key, dim, value in (("in_channels", "conv_in.weight", 1, cfg.in_channels),
                                   ("out_channels", "conv_out.weight", 0, cfg.out_channels)):
        if key in weights and weights[key].ndim == 4 and weights[key].shape[dim] != value:
            n = weights[key].shape[dim]
            raise FormatError(f"{config_path}: {field}={value}, but the weights' {key.split('.')[0]} has {n} "
                              f"channels; set \"{field}\": {n} in config.json (the config must describe its weights)")
    rows = weights.get("class_embedding.weight")
    expected_rows = None if cfg.num_classes is None else cfg.num_classes + 1
    if rows is not None and rows.ndim == 2 and rows.shape[0] != expected_rows:
        raise FormatError(f"{config_path}: num_class_embeds={json.dumps(expected_rows)}, but the weights' "
                          f"class_embedding has {rows.shape[0]} rows; set \"num_class_embeds\": {rows.shape[0]} in "
                          "config.json (the config must describe its weights)")
    trained = metadata.get(TRAINED_SIZE_KEY)
    if trained is not None and trained.isdigit() and int(trained) != cfg.image_size:
        raise FormatError(
            f"{config_path}: sample_size={cfg.image_size}, but these weights were trained at {trained}x{trained} "
            f"(self-attention at {attention_sizes(cfg, int(trained))}); at {cfg.image_size} the net would sample "
            f"{cfg.image_size}x{cfg.image_size} images with attention at {attention_sizes(cfg)}, a network it never "
            f"was. Set \"sample_size\": {trained} in config.json")
