"""Training data: the embedded digits, Hugging Face ``datasets`` by name, and local image folders."""

from diffusion_lab.data.datamodule import DiffusionDataModule, ImageTransform
from diffusion_lab.data.sources import (DataError, DigitsSource, FolderSource, HFSource, LabelColumnError,
                                        SyntheticSource)

__all__ = ["DiffusionDataModule", "ImageTransform", "DataError", "LabelColumnError", "DigitsSource", "FolderSource", "HFSource", "SyntheticSource"]
