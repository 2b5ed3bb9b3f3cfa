"""The DDPM U-Net (Ho et al. 2020, appendix B; ``diffusion_tf/models/unet.py`` of the original code).

A PixelCNN++-style U-Net: sinusoidal timestep embedding -> 2-layer MLP (4*ch); per resolution
``num_res_blocks`` residual blocks (GroupNorm(32) + SiLU + dropout, timestep projection), self-attention at
``attn_resolutions``; strided-conv downsampling, nearest + conv upsampling; skip connections from every
down block to the matching up block. Weights follow the original initialisation (Xavier-uniform "fan_avg",
and the output convolution of every residual branch scaled by 1e-5, i.e. variance 1e-10).

With ``num_classes`` set the net is class-conditional as in improved-diffusion (Nichol & Dhariwal 2021): a learned
``class_embedding`` (``nn.Embedding(num_classes + 1, 4*ch)``) is added to the timestep embedding right after its
MLP, before any residual block reads it. Row ``num_classes`` is the null class of classifier-free guidance (Ho &
Salimans 2022), used when ``class_labels`` is None. An unconditional net (``num_classes=None``) has no such module
and is the DDPM network unchanged: the same parameters, state_dict keys, initial weights and outputs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lab.errors import ConfigError


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128  # base width; every width must be a multiple of 32 for GroupNorm(32)
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # widths per resolution: 32, 16, 8, 4 for CIFAR-10
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # spatial sizes that get self-attention
    dropout: float = 0.1  # 0.1 on CIFAR-10; the 256x256 models use 0.0
    resamp_with_conv: bool = True
    downsample_padding: int = 0  # 0: TF "SAME" (pad right/bottom), as the original; 1: symmetric (diffusers' default)
    num_heads: int = 1  # the original network uses single-head attention
    norm_groups: int = 32
    norm_eps: float = 1e-6  # tf.contrib.layers.group_norm's epsilon
    num_classes: int | None = None  # class-conditional with this many classes (+1 null class); None: unconditional

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        levels = len(self.ch_mult)
        if levels < 1:
            raise ConfigError("model.net.ch_mult must name at least one resolution")
        if self.image_size % (2 ** (levels - 1)):
            raise ConfigError(
                f"model.net.image_size={self.image_size} cannot be halved {levels - 1} times "
                f"(len(ch_mult)={levels}); use an image size divisible by {2 ** (levels - 1)} or fewer levels"
            )
        resolutions = self.resolutions
        bad = [r for r in self.attn_resolutions if r not in resolutions]
        if bad:
            raise ConfigError(
                f"model.net.attn_resolutions={list(self.attn_resolutions)} includes {bad}, which this network never "
                f"visits; allowed: {list(resolutions)}"
            )
        if self.downsample_padding not in (0, 1):
            raise ConfigError(f"model.net.downsample_padding must be 0 or 1, got {self.downsample_padding}")
        for width in [self.ch * m for m in self.ch_mult]:
            if width % self.norm_groups or width % self.num_heads:
                raise ConfigError(
                    f"channel width {width} (model.net.ch * ch_mult) must be divisible by norm_groups="
                    f"{self.norm_groups} and num_heads={self.num_heads}"
                )
        if self.num_classes is not None:
            n = self.num_classes
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise ConfigError(
                    f"model.net.num_classes={n!r} is not a number of classes; set it to a whole number >= 1 (the "
                    "data's classes; the null class of classifier-free guidance is added on top) or to null for an "
                    "unconditional net"
                )
            self.num_classes = int(n)

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))


def timestep_embedding(t: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding [sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (dim/2 - 1)) (tensor2tensor / Ho et al.).

    Computed in float32 (float64 when asked for: t up to 1000 times the frequencies needs more than bf16's
    8 bits of mantissa) and returned in ``dtype``, the dtype of the network's weights.
    """
    half = dim // 2
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=compute, device=t.device) / (half - 1))
    args = t.to(compute)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return (F.pad(emb, (0, 1)) if dim % 2 else emb).to(dtype)


def _init(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """TF's variance_scaling(scale, 'fan_avg', 'uniform') and zero bias, as in the original code."""
    nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)
    return module


def group_norm_any_layout(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None,
                          eps: float) -> Tensor:
    """``F.group_norm`` from ops that keep ``x``'s memory layout (no copy to NCHW and back for channels-last input).

    The statistics come from a (B, G, C/G, H, W) view (splitting C is a view in any layout), then one pass
    ``x * scale + shift`` with per-(image, channel) ``scale = weight / sqrt(var + eps)``, ``shift = bias - mean *
    scale``; elementwise ops follow the layout of ``x``. Computed in at least float32, as autocast runs
    ``group_norm``: under autocast the result is float32 (as torch's), otherwise ``x``'s dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c = x.to(compute)
    b, c = x.shape[:2]
    spatial = x.dim() - 2
    groups = x_c.unflatten(1, (num_groups, c // num_groups))  # (B, G, C/G, *spatial)
    var, mean = torch.var_mean(groups, dim=tuple(range(2, groups.dim())), correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps).expand(b, num_groups, c // num_groups, *[1] * spatial)
    if weight is not None:
        scale = scale * weight.to(compute).view(1, num_groups, -1, *[1] * spatial)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(compute).view(1, num_groups, -1, *[1] * spatial)
    out = torch.addcmul(shift.flatten(1, 2), x_c, scale.flatten(1, 2))
    autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    return out if autocast else out.to(x.dtype)


def is_channels_last(x: Tensor) -> bool:
    """A 4-d tensor in NHWC memory order (and not also plain NCHW, as a 1x1 image or one channel would be)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (the same parameters, state_dict keys and maths) that keeps channels-last input
    channels-last off the CPU.

    torch's CUDA kernel works on NCHW only: given a channels-last input it copies it to NCHW and returns NCHW, and
    the next convolution, whose weights are channels-last, copies it back, so every norm of a channels-last U-Net
    costs two full layout copies (one reason eager ``channels_last`` was slower on the H200, benchmarks README).
    For that input this runs :func:`group_norm_any_layout` instead. On the CPU torch's kernel has its own
    channels-last path, and NCHW input goes to torch's kernel everywhere, so both are unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" or not is_channels_last(x):
            return super().forward(x)
        return group_norm_any_layout(x, self.num_groups, self.weight, self.bias, self.eps)


def _norm(cfg: UNetConfig, channels: int) -> nn.GroupNorm:
    return GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


class ResBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, temb_ch: int) -> None:
        super().__init__()
        self.norm1 = _norm(cfg, in_ch)
        self.conv1 = _init(nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = _init(nn.Linear(temb_ch, out_ch))
        self.norm2 = _norm(cfg, out_ch)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = _init(nn.Conv2d(out_ch, out_ch, 3, padding=1), scale=1e-10)
        self.skip = _init(nn.Conv2d(in_ch, out_ch, 1)) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        # The two additions write into the convolutions' fresh outputs (a convolution's backward needs its input,
        # not its output), saving two full-size allocations and passes over memory per block.
        h = self.conv1(F.silu(self.norm1(x)))
        h += self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.skip(x))


class AttnBlock(nn.Module):
    """Self-attention over all positions, with q, k, v and the output as 1x1 projections.

    The parameters are the four 1x1 convolutions of the original code (so checkpoints and the diffusers mapping
    keep their names), but the forward pass runs them as matrix products on the token layout (B, HW, C): q, k
    and v in one fused product with the concatenated weights, giving SDPA inputs whose last dimension is
    contiguous (what its fused CPU/GPU kernels need; a (B, C, HW) layout sends it to the unfused math path), and
    the output projection writes straight into a channels-last view of (B, C, H, W) - no layout copies.
    """

    def __init__(self, cfg: UNetConfig, ch: int) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.norm = _norm(cfg, ch)
        self.q, self.k, self.v = (_init(nn.Conv2d(ch, ch, 1)) for _ in range(3))
        self.proj_out = _init(nn.Conv2d(ch, ch, 1), scale=1e-10)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        heads = self.num_heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): a view when x is channels-last
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)  # (3C, C)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        qkv = F.linear(tokens, weight, bias).view(b, h * w, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, C/heads), last dim contiguous
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + out.transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W) with channels-last strides, a view


class Downsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool, padding: int = 0) -> None:
        super().__init__()
        self.padding = padding
        self.conv = _init(nn.Conv2d(ch, ch, 3, stride=2, padding=padding)) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        if self.padding == 0:
            # TF's "SAME" padding for a stride-2 3x3 conv on an even size pads one pixel on the right/bottom only.
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, with_conv: bool) -> None:
        super().__init__()
        self.conv = _init(nn.Conv2d(ch, ch, 3, padding=1)) if with_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class UNet(nn.Module):
    """``UNet(**UNetConfig fields)(x_t, t, class_labels=None) -> prediction`` with the shape of ``x_t``.

    The contract the rest of the code relies on: ``net.config.in_channels``, ``out_channels``, ``image_size`` and
    ``num_classes`` (None: unconditional; else labels ``0 .. num_classes - 1`` and the null label ``num_classes``).
    """

    config_class = UNetConfig

    def __init__(self, **kwargs) -> None:
        super().__init__()
        cfg = self.config = UNetConfig(**kwargs)
        ch, temb_ch = cfg.ch, cfg.ch * 4
        self.temb = nn.Sequential(_init(nn.Linear(ch, temb_ch)), nn.SiLU(), _init(nn.Linear(temb_ch, temb_ch)))
        self.conv_in = _init(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))

        # Downsampling path; remember the width of every feature map pushed onto the skip stack.
        self.down = nn.ModuleList()
        skip_widths, width = [ch], ch
        for level, (mult, res) in enumerate(zip(cfg.ch_mult, cfg.resolutions)):
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.blocks.append(ResBlock(cfg, width, ch * mult, temb_ch))
                width = ch * mult
                stage.attns.append(AttnBlock(cfg, width) if res in cfg.attn_resolutions else nn.Identity())
                skip_widths.append(width)
            last = level == len(cfg.ch_mult) - 1
            stage.downsample = None if last else Downsample(width, cfg.resamp_with_conv, cfg.downsample_padding)
            if stage.downsample is not None:
                skip_widths.append(width)
            self.down.append(stage)

        self.mid_block1 = ResBlock(cfg, width, width, temb_ch)
        self.mid_attn = AttnBlock(cfg, width)
        self.mid_block2 = ResBlock(cfg, width, width, temb_ch)

        # Upsampling path: num_res_blocks + 1 blocks per resolution, each eating one skip connection.
        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.ch_mult))):
            mult, res = cfg.ch_mult[level], cfg.resolutions[level]
            stage = nn.Module()
            stage.blocks, stage.attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.blocks.append(ResBlock(cfg, width + skip_widths.pop(), ch * mult, temb_ch))
                width = ch * mult
                stage.attns.append(AttnBlock(cfg, width) if res in cfg.attn_resolutions else nn.Identity())
            stage.upsample = Upsample(width, cfg.resamp_with_conv) if level > 0 else None
            self.up.append(stage)

        self.norm_out = _norm(cfg, width)
        self.conv_out = _init(nn.Conv2d(width, cfg.out_channels, 3, padding=1), scale=1e-10)

        # Created last and only for a conditional net, so an unconditional net draws the same initial weights
        # (and has the same state_dict) as before class conditioning existed. nn.Embedding's N(0, 1) init, as
        # improved-diffusion's label_emb and diffusers' class_embedding. Row num_classes: the null class.
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb_ch) if cfg.num_classes is not None else None

    @property
    def null_class(self) -> int | None:
        """The label of the null class (classifier-free guidance's unconditional input); None if unconditional."""
        return self.config.num_classes

    def _class_embedding(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        num_classes = self.config.num_classes
        if num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given, but this UNet was built without num_classes (it is unconditional); "
                    "build it with num_classes=<number of classes> (model.net.num_classes) or pass no class_labels"
                )
            return None
        if class_labels is None:  # the null class for the whole batch
            class_labels = torch.full((batch,), num_classes, dtype=torch.long, device=device)
        if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise ValueError(
                f"class_labels must be an integer (int64) tensor of labels, got dtype {class_labels.dtype}"
            )
        if class_labels.ndim == 0:
            class_labels = class_labels.expand(batch)
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},) (one label per image), "
                             f"got {tuple(class_labels.shape)}")
        return self.class_embedding(class_labels)

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """``x`` (B, C, H, W), ``t`` (B,) or a scalar; ``class_labels`` (B,) int64 in ``[0, num_classes]`` (value
        ``num_classes``: the null class) or None (the null class for the whole batch; required None when the net
        is unconditional)."""
        cfg = self.config
        if x.shape[1] != cfg.in_channels or x.shape[-1] != cfg.image_size or x.shape[-2] != cfg.image_size:
            raise ValueError(
                f"UNet expects (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) inputs, got {tuple(x.shape)}"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(timestep_embedding(t, cfg.ch, self.conv_in.weight.dtype))
        cemb = self._class_embedding(class_labels, x.shape[0], x.device)
        if cemb is not None:
            temb = temb + cemb  # improved-diffusion: emb = emb + self.label_emb(y)

        hs = [self.conv_in(x)]
        for stage in self.down:
            for block, attn in zip(stage.blocks, stage.attns):
                hs.append(attn(block(hs[-1], temb)))
            if stage.downsample is not None:
                hs.append(stage.downsample(hs[-1]))

        h = self.mid_block2(self.mid_attn(self.mid_block1(hs[-1], temb)), temb)

        for stage in self.up:
            for block, attn in zip(stage.blocks, stage.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            if stage.upsample is not None:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def config_dict(self) -> dict:
        return asdict(self.config)
