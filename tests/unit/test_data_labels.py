"""Class labels from every source, and the (images, labels) batches of a labelled data module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data import DataError, DiffusionDataModule, DigitsSource, FolderSource, HFSource, SyntheticSource
from diffusion_lab.data.sources import LabelColumnError

DIGITS_HISTOGRAM = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's digits, classes 0..9


def epoch(dm: DiffusionDataModule, seed: int = 0) -> list:
    """One epoch of finished training batches (as the training step receives them)."""
    dm.setup("fit")
    torch.manual_seed(seed)
    return [dm.on_after_batch_transfer(batch, 0) for batch in dm.train_dataloader()]


def coded_image(label: int, instance: int, size: int = 8) -> Image.Image:
    """A flat grey image whose value 40 * label + instance gives back its label (any flip or resize keeps it)."""
    return Image.fromarray(np.full((size, size), 40 * label + instance, dtype=np.uint8), mode="L").convert("RGB")


def decoded_labels(images: torch.Tensor) -> torch.Tensor:
    """The labels that coded_image wrote into finished images in [-1, 1]."""
    values = ((images + 1) / 2 * 255).round().flatten(1)
    assert bool((values == values[:, :1]).all())  # still flat: nothing mixed images
    return (values[:, 0] // 40).long()


# --- digits -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_memory", [True, False])
def test_digits_labels_are_sklearns_targets(in_memory):
    from sklearn.datasets import load_digits

    digits = load_digits()
    dm = DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=1797, in_memory=in_memory)
    assert dm.num_classes == 10 and dm.class_names == [str(d) for d in range(10)]
    assert dm.labels[:10].tolist() == list(range(10))  # sklearn's first ten digits are 0, 1, ..., 9
    assert dm.labels[[100, 1000, 1796]].tolist() == [4, 1, 8]
    assert torch.bincount(dm.labels).tolist() == DIGITS_HISTOGRAM
    dm.setup("fit")
    loader = dm.train_dataloader()
    order = loader.sampler.permutation()  # the loader's shuffle for epoch 0
    batches = [dm.on_after_batch_transfer(batch, 0) for batch in loader]
    assert len(batches) == 1
    (images, labels), = batches
    assert labels.dtype == torch.int64 and labels.shape == (1797,)
    # every image of the shuffled batch sits beside sklearn's target of that very image
    expected = torch.from_numpy(digits.images).float().div(16).mul(2).sub(1).unsqueeze(1)[order]
    assert torch.equal(images, expected)
    assert torch.equal(labels, torch.from_numpy(digits.target).long()[order])
    assert torch.bincount(labels).tolist() == DIGITS_HISTOGRAM
    assert order[:5].tolist() != list(range(5))  # shuffled, so the check above is not the identity


def test_digits_limit_keeps_the_first_labels_and_the_class_count():
    dm = DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=4, limit=12)
    assert dm.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert dm.num_classes == 10


def test_labels_follow_a_mid_epoch_resume_exactly():
    dm = DiffusionDataModule(DigitsSource(), image_size=8, channels=1, batch_size=64, in_memory=True)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    loader = dm.train_dataloader()
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for (a_images, a_labels), (b_images, b_labels) in zip(rest, full[3:]):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def test_synthetic_has_no_labels_and_plain_batches():
    dm = DiffusionDataModule(SyntheticSource(num_images=8, channels=3, image_size=4), image_size=4, batch_size=4,
                             in_memory=True)
    assert dm.num_classes is None and dm.class_names is None and dm.labels is None
    batch = epoch(dm)[0]
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 3, 4, 4)


# --- Hugging Face ---------------------------------------------------------------------------------------------

@pytest.fixture
def hf_labelled(tmp_path):
    """A saved data set: 20 images whose pixels encode their label, a plain int64 `label` column, a caption."""
    import datasets

    labels = [(7 * i) % 5 for i in range(20)]
    ds = datasets.Dataset.from_dict(
        {"image": [coded_image(y, i % 4) for i, y in enumerate(labels)], "label": labels,
         "caption": [f"c{i}" for i in range(20)]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                    "caption": datasets.Value("string")}),
    )
    path = tmp_path / "labelled"
    ds.save_to_disk(str(path))
    return path, labels


@pytest.mark.parametrize("in_memory", [True, False])
def test_hf_label_column_gives_the_saved_labels(hf_labelled, in_memory):
    path, labels = hf_labelled
    dm = DiffusionDataModule(HFSource(str(path), label_column="label"), image_size=8, channels=3, batch_size=5,
                             hflip=True, in_memory=in_memory)
    assert dm.labels.tolist() == labels
    assert dm.num_classes == 5 and dm.class_names is None  # an int column: K = max + 1, no names
    batches = epoch(dm)
    assert len(batches) == 4
    seen = []
    for images, batch_labels in batches:
        assert batch_labels.dtype == torch.int64 and batch_labels.shape == (5,)
        assert torch.equal(decoded_labels(images), batch_labels)  # each label sits beside its own image
        seen += batch_labels.tolist()
    assert sorted(seen) == sorted(labels)


def test_hf_class_label_names(hf_cifar_like):
    source = HFSource(str(hf_cifar_like), label_column="label")
    dm = DiffusionDataModule(source, image_size=32, channels=3, batch_size=4)
    assert dm.labels.tolist() == [i % 10 for i in range(12)]
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]  # ClassLabel(num_classes=10)
    assert source.num_classes == 10


def test_hf_without_label_column_is_unlabelled(hf_labelled):
    path, _ = hf_labelled
    dm = DiffusionDataModule(HFSource(str(path)), image_size=8, channels=3, batch_size=5)
    assert dm.num_classes is None and dm.labels is None
    assert isinstance(epoch(dm)[0], torch.Tensor)


def test_hf_bad_label_column_is_named_with_the_fix(hf_labelled):
    path, _ = hf_labelled
    with pytest.raises(LabelColumnError, match=r"data.source.label_column='labels' is not a column of .*columns: "
                                               r"\['image', 'label', 'caption'\].*'label'.*null") as info:
        DiffusionDataModule(HFSource(str(path), label_column="labels"), batch_size=2).setup()
    assert isinstance(info.value, DataError)
    with pytest.raises(LabelColumnError, match="label_column='caption'.*not integer class indices"):
        DiffusionDataModule(HFSource(str(path), label_column="caption"), batch_size=2).setup()


# --- folders --------------------------------------------------------------------------------------------------

def class_tree(root, counts: dict[str, int]):
    """One subfolder per class (created in the given order), each image's pixels encoding its sorted class index."""
    order = sorted(counts)
    for name, n in counts.items():
        for i in range(n):
            folder = root / name / ("nested" if i == 0 else "")  # ImageFolder also looks inside class subfolders
            folder.mkdir(parents=True, exist_ok=True)
            coded_image(order.index(name), i, size=12).save(folder / f"img{i}.png")
    return root


@pytest.mark.parametrize("in_memory", [True, False])
def test_folder_classes_are_image_folders(tmp_path, in_memory):
    from torchvision.datasets import ImageFolder

    root = class_tree(tmp_path / "tree", {"zebra": 3, "ant": 4, "moth": 2})
    (root / "notes.txt").write_text("not an image")
    source = FolderSource(str(root))
    dm = DiffusionDataModule(source, image_size=8, channels=3, batch_size=3, in_memory=in_memory)
    reference = ImageFolder(str(root))
    assert dm.class_names == reference.classes == ["ant", "moth", "zebra"]
    assert dm.num_classes == source.num_classes == 3
    files = source.load().files  # the files in the order of dm.labels
    assert {str(path): int(label) for path, label in zip(files, dm.labels)} == dict(reference.samples)
    assert len(files) == len(reference.samples) == 9
    assert torch.bincount(dm.labels).tolist() == [4, 2, 3]
    for images, labels in epoch(dm):
        assert torch.equal(decoded_labels(images), labels)


def test_folder_per_image_labels_through_worker_processes(tmp_path):
    root = class_tree(tmp_path / "tree", {"b": 3, "a": 3})
    dm = DiffusionDataModule(FolderSource(str(root)), image_size=8, channels=3, batch_size=2, num_workers=1)
    batches = epoch(dm)
    assert len(batches) == 3
    for images, labels in batches:
        assert isinstance(labels, torch.Tensor) and labels.dtype == torch.int64
        assert torch.equal(decoded_labels(images), labels)


def test_folder_with_images_in_the_root_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(4):
        coded_image(1, i).save(root / f"{i}.png")
    dm = DiffusionDataModule(FolderSource(str(root)), image_size=8, channels=3, batch_size=2)
    assert dm.num_classes is None and dm.class_names is None
    assert isinstance(epoch(dm)[0], torch.Tensor)
