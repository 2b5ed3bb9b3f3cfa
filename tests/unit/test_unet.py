"""The DDPM U-Net: parameter counts of the paper configs, shapes, the timestep embedding, config errors."""

import math

import pytest
import torch

from diffusion_lab.nets import UNet, timestep_embedding
from tests.conftest import tiny_unet


def count(net):
    return sum(p.numel() for p in net.parameters())


def test_cifar10_config_has_35_7m_parameters():
    n = count(UNet())  # the defaults are the CIFAR-10 config
    print(f"DDPM CIFAR-10 U-Net parameters: {n:,}")
    # 35,746,307 is also the count of the converted original checkpoint (diffusers google/ddpm-cifar10-32).
    assert n == 35_746_307


def test_256_config_has_about_114m_parameters():
    with torch.device("meta"):  # count without allocating 450 MB
        net = UNet(image_size=256, ch_mult=(1, 1, 2, 2, 4, 4), dropout=0.0)
    n = count(net)
    print(f"DDPM 256x256 U-Net parameters: {n:,}")
    assert n == 113_673_219  # "114M" in Ho et al.


@pytest.mark.parametrize(
    "overrides, shape",
    [
        (dict(ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)), (3, 1, 8, 8)),
        (dict(image_size=16, in_channels=3, out_channels=3, ch_mult=(1, 2), attn_resolutions=(8,)), (2, 3, 16, 16)),
    ],
)
def test_output_shape_and_timestep_dependence(overrides, shape):
    torch.manual_seed(0)
    net = tiny_unet(perturb=0.02, **overrides).eval()  # perturbed: the output convolutions start near zero
    x = torch.randn(shape)
    out_a = net(x, torch.full((shape[0],), 10))
    out_b = net(x, torch.full((shape[0],), 900))
    assert out_a.shape == shape
    assert not torch.allclose(out_a, out_b)  # the timestep reaches the output


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1, 7]), 4)
    # half = 2 frequencies: 10000^(-0/1) = 1 and 10000^(-1/1) = 1e-4; layout [sin..., cos...]
    expected = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)],
            [math.sin(7), math.sin(7e-4), math.cos(7), math.cos(7e-4)],
        ]
    )
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(torch.tensor([3]), 128).shape == (1, 128)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="attn_resolutions.*allowed: \\[8, 4\\]"):
        tiny_unet(image_size=8, ch_mult=(1, 2), attn_resolutions=(16,))
    with pytest.raises(ValueError, match="image_size=10"):
        tiny_unet(image_size=10, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="expects \\(B, 3, 32, 32\\)"):
        tiny_unet(image_size=32, in_channels=3, ch_mult=(1, 2))(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.bfloat16, 0.1)])
def test_forward_with_parameters_in_any_float_dtype(dtype, tol):
    """net.to(dtype) runs end to end (the timestep embedding follows the weights' dtype) and agrees with fp32:
    float64 to rounding, bf16 within its 8-bit mantissa (relative error ~1e-2 per op, a few % at the output)."""
    torch.manual_seed(0)
    net = tiny_unet(perturb=0.02, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        reference = net(x, t)
        out = net.to(dtype)(x.to(dtype), t)
    assert out.dtype == dtype
    error = (out.float() - reference).norm() / reference.norm()
    assert error < tol, f"relative error {error:.2e} in {dtype}"


def reference_attention(block, x):
    """The original formulation: q, k, v as 1x1 convolutions on (B, C, H, W), softmax(q^T k / sqrt(d)) v per head."""
    b, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    hn = block.norm(x)
    q, k, v = (conv(hn).reshape(b, heads, d, h * w) for conv in (block.q, block.k, block.v))
    weights = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(d), dim=-1)  # (B, heads, HW, HW)
    out = (v @ weights.transpose(-1, -2)).reshape(b, c, h, w)
    return x + block.proj_out(out)


@pytest.mark.parametrize("num_heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_qkv_attention_equals_the_three_projection_formula(num_heads, channels_last):
    """The block runs q/k/v as one product on the token layout; the maths must stay that of the separate 1x1
    convolutions (so checkpoints and the diffusers mapping keep meaning the same thing), forward and backward."""
    from diffusion_lab.nets.unet import AttnBlock, UNetConfig

    torch.manual_seed(0)
    block = AttnBlock(UNetConfig(ch=64, num_heads=num_heads), 64).double()
    for p in block.parameters():
        p.data.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    got, expected = block(x), reference_attention(block, x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, block.q.weight, block.v.bias], g)
    ref_grads = torch.autograd.grad(expected, [x, block.q.weight, block.v.bias], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert sorted(k for k in block.state_dict() if not k.startswith("norm")) == sorted(
        f"{n}.{leaf}" for n in ("q", "k", "v", "proj_out") for leaf in ("weight", "bias"))


def test_channels_last_network_matches_the_default_layout():
    torch.manual_seed(0)
    overrides = dict(ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,))
    net = tiny_unet(perturb=0.02, **overrides).eval()
    nhwc = tiny_unet(**overrides).eval()
    nhwc.load_state_dict(net.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x.contiguous(memory_format=torch.channels_last), t), net(x, t), rtol=1e-4, atol=1e-5)


def test_unconditional_net_is_unchanged_by_class_conditioning():
    """num_classes=None must be the DDPM network exactly as before class conditioning existed: the same state_dict
    keys, the same initial RNG draws and the same outputs. The numbers below were computed with the code of main
    before num_classes was added (commit 6a6af50), on this very construction; a change to them means unconditional
    checkpoints or seeded runs would no longer reproduce."""
    import hashlib

    torch.manual_seed(0)
    net = tiny_unet(perturb=0.02, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=None).eval()
    keys = list(net.state_dict())
    assert net.config.num_classes is None and net.class_embedding is None
    assert not any("class" in k for k in keys)
    assert len(keys) == 144
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == (
        "0789caab29b5d56cc0da048157116fc7702539b6454ee771e1f4b1f961e61d01")
    assert count(net) == 701_345
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x, torch.tensor([5, 600])).double()
    # float32 on CPU: agreement to ~1e-6 relative; a different RNG sequence at init changes these at O(1)
    assert out.sum().item() == pytest.approx(4.852312688715756, rel=1e-4)
    assert out.abs().sum().item() == pytest.approx(19.388812047429383, rel=1e-4)
    torch.testing.assert_close(out[0, 0, 0, :4].float(), torch.tensor(
        [0.06941677629947662, 0.40045246481895447, 0.08717066049575806, 0.0004120953381061554]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, 0, 7, 4:].float(), torch.tensor(
        [-0.10413932800292969, -0.39619484543800354, 0.22286760807037354, -0.05774546414613724]), rtol=1e-4, atol=1e-5)
    # the init draws alone (no perturbation): the first and the last module built
    torch.manual_seed(0)
    fresh = tiny_unet(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    assert fresh.temb[0].weight.double().sum().item() == pytest.approx(4.377591750399006, rel=1e-6)
    assert fresh.conv_out.weight.double().sum().item() == pytest.approx(1.0044699481071007e-05, rel=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_classes_errors_name_the_key(bad):
    from diffusion_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.net\.num_classes=.*whole number >= 1.*or to null"):
        tiny_unet(num_classes=bad)
