"""Feature extractors for FID / IS / KID, all behind torch-fidelity's ``FeatureExtractorBase`` interface.

- ``inception-v3-compat``: torch-fidelity's port of the TF 2015-12-05 Inception graph (the papers' numbers);
  weights from torch-fidelity's own download/cache, or a local file for clusters without internet.
- ``digits-classifier``: a small CNN trained deterministically on scikit-learn's digits, so the same metric
  code gives meaningful numbers offline on the embedded data. Its 64-d pre-activation layer (full-rank
  covariance, unlike post-ReLU features) serves FID/KID; its logits serve IS. The network is this project's own
  (no package ships one); it is trained on first use (~10 s on a CPU) and cached.
- ``digits-pixels``: no network at all: the 64 pixel values themselves, in the digits' own 0-16 intensity units.
  A second, independent yardstick for FID on digits (issue 17): it sees what a classifier is built to ignore
  (a brightness or contrast shift, speckle noise, a wrong pixel histogram) and shares no training, split or
  seed with ``digits-classifier``. It has no logits, so it serves FID/KID/precision-recall but not IS.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from diffusion_lab.errors import UserError

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_PARAMETERS = 23_885_486  # float32 values in that file: about 95.5 MB
DIGITS_CLASSIFIER_VERSION = 1


class WeightsError(UserError, FileNotFoundError):
    """A feature extractor's weights are missing; the message says which file to place where."""


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSION_LAB_CACHE", Path.home() / ".cache" / "diffusion_lab"))


# --- Inception ---------------------------------------------------------------------------------------
def inception_weights_path(weights_path: str | None = None, allow_download: bool = True) -> str | None:
    """The weights file to use, checked *before* any sampling. None means torch-fidelity's cached download.

    Raises :class:`WeightsError` naming the file, its size and where to put it when it cannot be had.
    """
    if weights_path:
        if not Path(weights_path).is_file():
            raise WeightsError(_missing_inception_message(f"The Inception weights file {weights_path!r} does not exist."))
        return weights_path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    if cached.is_file():
        return str(cached)
    if not allow_download:
        raise WeightsError(_missing_inception_message("Downloads are off."))
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - any network failure means the same thing here
        raise WeightsError(_missing_inception_message(f"The download failed ({type(error).__name__}).")) from error
    return str(cached)


def _missing_inception_message(reason: str) -> str:
    target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_NAME
    return (
        f"Inception-v3 weights for FID/IS are not available. {reason} Place the file {INCEPTION_WEIGHTS_NAME} "
        f"(about 95.5 MB: {INCEPTION_PARAMETERS:,} float32 values; torch-fidelity's release v0.2.0) at {target}, "
        "or anywhere and point to it: inception_weights=/path/to/it for diffusion-lab-eval, "
        "callbacks.fid.inception_weights=/path/to/it for diffusion-lab-train."
    )


def inception_extractor(weights_path: str | None = None, allow_download: bool = True) -> FeatureExtractorBase:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path(weights_path, allow_download)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=path)


# --- digits classifier -------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """(B, 1, 8, 8) digits in [0, 1] -> (64-d features, 10 logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.features = nn.Linear(64 * 4 * 4, 64)  # read before its ReLU: full-rank covariance
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(self.conv(x).flatten(1))
        return features, self.head(features)


def digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed 80/20 split of the 1,797 digits: (train x, train y, held-out x, held-out y), x in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16).unsqueeze(1)
    y = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def train_digits_classifier(seed: int = 0, epochs: int = 30) -> tuple[DigitsClassifier, float]:
    """Train deterministically on CPU; returns the network and its held-out accuracy."""
    torch.manual_seed(seed)
    x, y, x_test, y_test = digits_split(seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(x), generator=g).split(64):
            # light augmentation: shift by one pixel, so generated digits slightly off-centre still classify
            shift = tuple(torch.randint(-1, 2, (2,), generator=g).tolist())
            loss = F.cross_entropy(net(torch.roll(x[batch], shift, dims=(2, 3)))[1], y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test)[1].argmax(1) == y_test).float().mean().item()
    return net, accuracy


def load_digits_classifier() -> tuple[DigitsClassifier, float]:
    """The cached classifier (trained on first use) and its held-out accuracy."""
    path = cache_dir() / f"digits_classifier_v{DIGITS_CLASSIFIER_VERSION}.pt"
    net = DigitsClassifier()
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state_dict"])
        return net.eval(), float(saved["accuracy"])
    net, accuracy = train_digits_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save({"state_dict": net.state_dict(), "accuracy": accuracy}, tmp)
    os.replace(tmp, path)
    return net, accuracy


class _DigitsInput(FeatureExtractorBase):
    """What both digits extractors share: uint8 (B, C, H, W) images -> float (B, 1, 8, 8) grey levels in [0, 1]."""

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    @staticmethod
    def grey_8x8(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float().div(255)
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="area")
        return x


class FeatureExtractorDigits(_DigitsInput):
    """torch-fidelity interface to :class:`DigitsClassifier`: uint8 (B, C, H, W) -> ("64", "logits")."""

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)
        self.net, self.accuracy = load_digits_classifier()
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("64", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "64", "kid": "64", "prc": "64"}[metric]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, logits = self.net(self.grey_8x8(x))
        out = {"64": features, "logits": logits}
        return tuple(out[name] for name in self.features_list)


class FeatureExtractorDigitsPixels(_DigitsInput):
    """uint8 (B, C, H, W) -> ("pixels",): the image as 8x8 grey levels on the digits' 0-16 scale, flattened.

    The scale is the data set's own (scikit-learn stores the digits as integers 0-16); FID scales with its
    square, so in these units 1,000 real digits against all 1,797 score about 4, as with the classifier.
    """

    def __init__(self, name: str, features_list: list[str], **kwargs) -> None:
        super().__init__(name, features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pixels",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric == "isc":
            raise ValueError("digits-pixels has no logits: IS needs a classifier (digits-classifier)")
        return "pixels"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.grey_8x8(x).flatten(1) * 16,)


for _name, _cls in (("digits-classifier", FeatureExtractorDigits), ("digits-pixels", FeatureExtractorDigitsPixels)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, _cls)

EXTRACTORS = ("inception-v3-compat", "digits-classifier", "digits-pixels")
# Extractors whose logits classify a data set's own classes, in its label order: with them a conditional model's
# class accuracy is the fraction of samples classified as the class they were drawn for. Inception's logits are
# ImageNet's 1,008 classes, not CIFAR-10's, so with Inception no class accuracy is reported.
CLASSIFIES = {"digits-classifier": "digits"}
LAYERS = {"inception-v3-compat": ("2048", "logits_unbiased"), "digits-classifier": ("64", "logits"),
          "digits-pixels": ("pixels",)}


def make_extractor(name: str, inception_weights: str | None = None, allow_download: bool = True) -> FeatureExtractorBase:
    """The extractor ``name`` providing (FID/KID layer, IS layer), or the FID/KID layer alone (digits-pixels)."""
    if name == "inception-v3-compat":
        return inception_extractor(inception_weights, allow_download)
    if name == "digits-classifier":
        return FeatureExtractorDigits(name, list(LAYERS[name]))
    if name == "digits-pixels":
        return FeatureExtractorDigitsPixels(name, list(LAYERS[name]))
    raise ValueError(f"unknown metrics.feature_extractor {name!r}; allowed: {', '.join(EXTRACTORS)}")
