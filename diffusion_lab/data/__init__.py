"""Training data: the embedded digits, Hugging Face ``datasets`` by name, and local image folders."""

from diffusion_lab.data.datamodule import DiffusionDataModule, ImageTransform
from diffusion_lab.data.sources import DataError, DigitsSource, FolderSource, HFSource, SyntheticSource

__all__ = ["DiffusionDataModule", "ImageTransform", "DataError", "DigitsSource", "FolderSource", "HFSource", "SyntheticSource"]
