"""Data sources on local data of the same form as the real ones, and the errors for bad input."""

from __future__ import annotations

import pytest
import torch

from diffusion_lab.data import DataError, DiffusionDataModule, DigitsSource, FolderSource, HFSource
from tests.conftest import make_images, tiny_unet


def first_batch(dm: DiffusionDataModule) -> torch.Tensor:
    """The first training batch's images (a labelled source's batches are (images, labels) tuples)."""
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    if dm.num_classes is None:
        assert isinstance(batch, torch.Tensor)  # unlabelled: a plain image tensor, as before labels existed
        return batch
    images, labels = batch
    assert labels.dtype == torch.int64 and labels.shape == (len(images),)
    return images


def test_digits_are_the_real_1797_images_in_range():
    dm = DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=1797)
    x = first_batch(dm)
    assert x.shape == (1797, 1, 8, 8)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    # pixel values are the 17 levels k/16 mapped to [-1, 1]
    levels = torch.unique(((x + 1) / 2 * 16).round())
    assert levels.tolist() == list(range(17))


def test_digits_resized_to_rgb_16():
    x = first_batch(DiffusionDataModule(DigitsSource(), image_size=16, channels=3, batch_size=4))
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_hf_saved_to_disk_with_cifar_schema(hf_cifar_like):
    source = HFSource(str(hf_cifar_like))
    dm = DiffusionDataModule(source, image_size=32, channels=3, batch_size=4, hflip=True)
    x = first_batch(dm)
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    # the image column was detected (the other column is a ClassLabel)
    assert dm.train_set.base.column == "img"


def test_hf_parquet_folder_through_load_dataset(tmp_path):
    """The same `load_dataset(name, split=...)` call used for hub names, on a local parquet folder."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {"image": make_images(6, (64, 48)), "caption": ["x"] * 6},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    folder = tmp_path / "parquet_set" / "data"
    folder.mkdir(parents=True)
    ds.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    dm = DiffusionDataModule(HFSource(str(tmp_path / "parquet_set"), split="train"), image_size=16, channels=3,
                             batch_size=6, center_crop=True)
    x = first_batch(dm)
    assert x.shape == (6, 3, 16, 16)


def test_hf_errors_name_the_key(tmp_path, hf_cifar_like):
    with pytest.raises(DataError, match="data.source.image_column='picture'.*columns: \\['img', 'label'\\]"):
        first_batch(DiffusionDataModule(HFSource(str(hf_cifar_like), image_column="picture"), batch_size=2))
    import datasets

    no_image = tmp_path / "no_image"
    datasets.Dataset.from_dict({"a": [1, 2]}).save_to_disk(str(no_image))
    with pytest.raises(DataError, match="no column of type Image.*set data.source.image_column"):
        first_batch(DiffusionDataModule(HFSource(str(no_image)), batch_size=1))
    with pytest.raises(DataError, match="could not load the data set data.source.path='no-such-user/no-such-set'"):
        first_batch(DiffusionDataModule(HFSource("no-such-user/no-such-set"), batch_size=1))


def test_folder_source_recursive_and_greyscale(tmp_path):
    for i, image in enumerate(make_images(5, (40, 30), mode="L")):
        sub = tmp_path / "imgs" / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        image.save(sub / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    dm = DiffusionDataModule(FolderSource(str(tmp_path / "imgs")), image_size=8, channels=3, batch_size=5)
    x = first_batch(dm)
    assert x.shape == (5, 3, 8, 8)
    assert dm.class_names == ["a", "b"]  # one class per subfolder
    assert torch.equal(x[:, 0], x[:, 1])  # grey images become three equal channels


def test_folder_errors_name_the_folder_or_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images in data.source.root=.*empty"):
        first_batch(DiffusionDataModule(FolderSource(str(empty)), batch_size=1))
    with pytest.raises(DataError, match="is not a folder"):
        first_batch(DiffusionDataModule(FolderSource(str(tmp_path / "missing")), batch_size=1))
    bad = tmp_path / "bad"
    bad.mkdir()
    make_images(1, (8, 8))[0].save(bad / "good.png")
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot read image .*broken.png"):
        DiffusionDataModule(FolderSource(str(bad), verify=True), batch_size=1).setup()
    dm = DiffusionDataModule(FolderSource(str(bad)), image_size=8, batch_size=2)
    dm.setup()
    with pytest.raises(DataError, match="broken.png"):
        next(iter(dm.train_dataloader()))


def test_shape_mismatch_with_the_model_is_named():
    dm = DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=4)
    net = tiny_unet(in_channels=3, out_channels=3)
    with pytest.raises(DataError, match="model.net.in_channels.*data.channels"):
        dm.check_model(net)


def test_batch_larger_than_the_data_set():
    with pytest.raises(DataError, match="data.batch_size=64 is larger than the data set \\(10 images\\)"):
        DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=64, limit=10).setup()


def finished_batches(dm: DiffusionDataModule, seed: int = 0) -> list:
    """One epoch of training batches as the training step receives them (after on_after_batch_transfer):
    image tensors, or (images, labels) for a labelled source."""
    dm.setup("fit")
    torch.manual_seed(seed)
    return [dm.on_after_batch_transfer(batch, 0) for batch in dm.train_dataloader()]


def png_folder(root, n=40, size=(32, 32)):
    root.mkdir()
    for i, image in enumerate(make_images(n, size)):
        image.save(root / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("source", ["digits", "png"])
def test_in_memory_batches_equal_the_per_image_path(tmp_path, source):
    """Same shuffle (torch's RNG), same pixels, same arithmetic: bit-identical batches without flips; PNGs are
    stored as uint8, the digits (17 float levels) as float so that nothing is quantised."""
    if source == "digits":
        make, shape = DigitsSource, dict(image_size=8, channels=1)
    else:
        root = png_folder(tmp_path / "png")
        make, shape = (lambda: FolderSource(str(root))), dict(image_size=32, channels=3)
    reference = DiffusionDataModule(make(), batch_size=16, **shape)
    per_image = finished_batches(reference)
    dm = DiffusionDataModule(make(), batch_size=16, in_memory=True, **shape)
    in_memory = finished_batches(dm)
    assert dm.train_set.images.dtype == (torch.float32 if source == "digits" else torch.uint8)
    assert len(in_memory) == len(per_image) > 1
    for a, b in zip(in_memory, per_image):
        if source == "digits":  # labelled: the same labels beside the same images
            assert isinstance(a, tuple) and isinstance(b, tuple)
            assert torch.equal(a[1], b[1]) and a[1].dtype == torch.int64
            a, b = a[0], b[0]
        assert torch.equal(a, b)
    # item access (used by the reference statistics) gives the same finished images
    assert torch.equal(dm.train_set[3], reference.train_set[3])


def test_in_memory_flips_a_random_half_of_the_batch_on_its_device(tmp_path):
    root = png_folder(tmp_path / "png", n=256, size=(8, 8))
    dm = DiffusionDataModule(FolderSource(str(root)), image_size=8, channels=3, batch_size=256, hflip=True,
                             in_memory=True)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    assert raw.dtype == torch.uint8  # the loader moves bytes; scaling and flips happen after the transfer
    torch.manual_seed(1)
    out = dm.on_after_batch_transfer(raw, 0)
    plain = raw.float() / 255 * 2 - 1
    same = (out == plain).flatten(1).all(1)
    mirrored = (out == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # every image is itself or its mirror image
    assert 90 < int(mirrored.sum()) < 166  # Binomial(256, 1/2): within 4.6 sigma
    torch.manual_seed(1)
    assert torch.equal(dm.on_after_batch_transfer(raw, 0), out)  # the flips follow torch's (restored) RNG


def test_in_memory_that_does_not_fit_is_named(monkeypatch):
    import diffusion_lab.data.datamodule as datamodule

    monkeypatch.setattr(datamodule, "_physical_memory_bytes", lambda: 2**20)
    with pytest.raises(DataError, match="data.in_memory=true needs .* set data.in_memory=false"):
        DiffusionDataModule(DigitsSource(), image_size=32, channels=3, batch_size=4, in_memory=True).setup()
