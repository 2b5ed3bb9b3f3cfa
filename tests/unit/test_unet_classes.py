"""Class conditioning of the U-Net (improved-diffusion's label embedding + a null class for classifier-free
guidance): where the embedding enters, the null class, the parameter count, errors, and the diffusers format."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffusion_lab.nets import UNet
from tests.conftest import perturbed, tiny_unet

ARCH = dict(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
NUM_CLASSES = 3


def count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.fixture(scope="module")
def nets():
    """A conditional net and the unconditional net built from the same seed, with the same shared weights."""
    torch.manual_seed(0)
    cond = perturbed(tiny_unet(num_classes=NUM_CLASSES, **ARCH))
    torch.manual_seed(0)
    uncond = tiny_unet(**ARCH).eval()
    uncond.load_state_dict({k: v for k, v in cond.state_dict().items() if k != "class_embedding.weight"})
    return cond, uncond


def inputs(batch: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.tensor([3, 250, 600, 999][:batch])


def test_contract_and_state_dict():
    torch.manual_seed(0)
    uncond = tiny_unet(**ARCH)
    torch.manual_seed(0)
    cond = tiny_unet(num_classes=NUM_CLASSES, **ARCH)
    assert (cond.config.in_channels, cond.config.out_channels, cond.config.image_size) == (1, 1, 8)
    assert (cond.config.num_classes, cond.null_class) == (NUM_CLASSES, NUM_CLASSES)
    assert (uncond.config.num_classes, uncond.null_class) == (None, None)
    # the conditional net = the unconditional one + class_embedding.weight, created last: the shared weights draw
    # the same numbers from the same seed
    assert list(cond.state_dict()) == list(uncond.state_dict()) + ["class_embedding.weight"]
    for key, value in uncond.state_dict().items():
        torch.testing.assert_close(cond.state_dict()[key], value, rtol=0, atol=0)
    assert cond.class_embedding.weight.shape == (NUM_CLASSES + 1, 4 * 32)  # 4 * ch: the width after the MLP


@pytest.mark.parametrize("num_classes", [1, 10, 1000])
def test_parameter_count_closed_form(num_classes):
    """conditional = unconditional + (num_classes + 1) * 4 * ch; for CIFAR-10 (ch=128) 35,746,307 + 512 (K + 1)."""
    with torch.device("meta"):
        n = count(UNet(num_classes=num_classes))
    assert n == 35_746_307 + (num_classes + 1) * 512
    assert count(tiny_unet(num_classes=num_classes)) == count(tiny_unet()) + (num_classes + 1) * 128


def test_labels_enter_only_through_the_embedding_after_the_mlp(nets):
    """net(x, t, y) == the unconditional net with E[y] added to the bias of the MLP's last layer: the label acts
    exactly as an addition to the timestep embedding after its MLP, before every residual block reads it."""
    # float64: the two ways add the same numbers in another order, which float32 rounds differently by up to ~1e-6
    # depending on the CPU's kernels (1.19e-6 on one VM); in float64 they agree to 1e-12
    cond, uncond = (copy.deepcopy(n).double() for n in nets)
    x, t = inputs()
    x = x.double()
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null class
    with torch.no_grad():
        got = cond(x, t, labels)
        for i, y in enumerate(labels.tolist()):
            shifted = tiny_unet(**ARCH).double().eval()
            shifted.load_state_dict(uncond.state_dict())
            shifted.temb[2].bias.add_(cond.class_embedding.weight[y])
            torch.testing.assert_close(got[i : i + 1], shifted(x[i : i + 1], t[i : i + 1]), rtol=1e-12, atol=1e-12)


def test_labels_change_the_output_and_none_is_the_null_class(nets):
    cond, uncond = nets
    x, t = inputs()
    with torch.no_grad():
        out = {y: cond(x, t, torch.full((4,), y)) for y in range(NUM_CLASSES + 1)}
        none = cond(x, t)
        plain = uncond(x, t)
    for a in range(NUM_CLASSES + 1):
        for b in range(a + 1, NUM_CLASSES + 1):
            diff = (out[a] - out[b]).abs().max().item()
            assert diff > 1e-2, f"labels {a} and {b} give the same output (max diff {diff:.2e})"
    torch.testing.assert_close(none, out[NUM_CLASSES], rtol=0, atol=0)  # None == the null label, exactly
    assert (none - plain).abs().max().item() > 1e-2  # the null class is a learned embedding, not "no embedding"
    # per-sample labels: each row equals the batch run with that label everywhere
    mixed = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        got = cond(x, t, mixed)
    for i, y in enumerate(mixed.tolist()):
        torch.testing.assert_close(got[i], out[y][i], rtol=1e-5, atol=1e-6)
    # a scalar label is broadcast over the batch
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t, torch.tensor(1)), out[1], rtol=0, atol=0)


def test_gradient_reaches_only_the_rows_used(nets):
    cond, _ = nets
    x, t = inputs(2)
    cond.zero_grad()
    cond(x, t, torch.tensor([0, 2])).square().mean().backward()
    grad = cond.class_embedding.weight.grad
    assert grad[[0, 2]].abs().sum(dim=1).min() > 0
    assert torch.equal(grad[[1, 3]], torch.zeros_like(grad[[1, 3]]))
    cond.zero_grad(set_to_none=True)


def test_label_errors():
    x, t = inputs(2)
    with pytest.raises(ValueError, match="built without num_classes"):
        tiny_unet(**ARCH)(x, t, torch.tensor([0, 1]))
    cond = tiny_unet(num_classes=NUM_CLASSES, **ARCH)
    with pytest.raises(ValueError, match="integer"):
        cond(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cond(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(IndexError):  # past the null class
        cond(x, t, torch.tensor([0, NUM_CLASSES + 1]))


# --- the diffusers format --------------------------------------------------------------------------------------
def test_unconditional_export_has_no_class_fields(tmp_path):
    from diffusion_lab.pipelines import save_unet

    save_unet(tiny_unet(**ARCH), tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert "num_class_embeds" not in config and "class_embed_type" not in config


def test_conditional_net_round_trips_through_diffusers(nets, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffusion_lab.pipelines import load_unet, save_unet

    cond, _ = nets
    save_unet(cond, tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert (config["num_class_embeds"], config["class_embed_type"]) == (NUM_CLASSES + 1, None)

    theirs = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    assert theirs.class_embedding.weight.shape == (NUM_CLASSES + 1, 128)
    assert count(theirs) == count(cond)
    x, t = inputs()
    labels = torch.tensor([0, 1, 2, NUM_CLASSES])  # every real class and the null class
    with torch.no_grad():
        ours_out = cond(x, t, labels)
        torch.testing.assert_close(theirs(x, t, class_labels=labels).sample, ours_out, rtol=1e-5, atol=1e-5)
        null = torch.full((4,), NUM_CLASSES)  # diffusers needs the null class spelt out; here None means it
        torch.testing.assert_close(theirs(x, t, class_labels=null).sample, cond(x, t), rtol=1e-5, atol=1e-5)

    back = load_unet(tmp_path / "unet")
    assert back.config.num_classes == NUM_CLASSES
    assert list(back.state_dict()) == list(cond.state_dict())
    for key, value in cond.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, labels), ours_out, rtol=0, atol=0)


def test_diffusers_class_conditional_net_loads_here(tmp_path):
    """A UNet2DModel with num_class_embeds = N is num_classes = N - 1 here (its last row is taken as the null class)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusion_lab.pipelines import load_unet

    theirs = perturbed(diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
        num_class_embeds=5), seed=2)
    theirs.save_pretrained(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    assert ours.config.num_classes == 4
    x, t = inputs()
    labels = torch.tensor([4, 0, 3, 1])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, labels), theirs(x, t, class_labels=labels).sample, rtol=1e-5, atol=1e-5)


def test_class_config_mismatches_are_named(nets, tmp_path):
    from diffusion_lab.pipelines import FormatError, load_unet, save_unet

    cond, _ = nets
    folder = tmp_path / "unet"
    save_unet(cond, folder)
    config = json.loads((folder / "config.json").read_text())
    for value, match in ((7, r"num_class_embeds=7, but the weights' class_embedding has 4 rows"),
                         (None, r"num_class_embeds=null, but the weights' class_embedding has 4 rows"),
                         (1, r"num_class_embeds=1 is not supported")):
        (folder / "config.json").write_text(json.dumps(config | {"num_class_embeds": value}))
        with pytest.raises(FormatError, match=match):
            load_unet(folder)
    (folder / "config.json").write_text(json.dumps(config | {"class_embed_type": "timestep"}))
    with pytest.raises(FormatError, match="class_embed_type='timestep' is not supported"):
        load_unet(folder)
