"""Data: sources (which images, which targets, which split), decoding and the scan, the feature
cache and the LightningDataModule that serves them."""

from transfer_learning.data.datamodule import ImageDataModule, ImageFolderDataModule

__all__ = ["ImageDataModule", "ImageFolderDataModule"]
