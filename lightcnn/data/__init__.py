"""LightningDataModules: digits (embedded, no download), CIFAR-10/100, ImageNet folders, synthetic.

Every `batch_size` here is the global batch size, split over the processes (see `base.py`).
"""
from lightcnn.data.base import ClassificationDataModule, EpochSeededRandomSampler
from lightcnn.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightcnn.data.digits import DigitsDataModule
from lightcnn.data.imagenet import ImageNetDataModule
from lightcnn.data.synthetic import SyntheticDataModule

__all__ = [
    "ClassificationDataModule", "EpochSeededRandomSampler", "DigitsDataModule", "CIFAR10DataModule",
    "CIFAR100DataModule", "ImageNetDataModule", "SyntheticDataModule",
]
