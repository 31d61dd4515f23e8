"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) through torchvision, with the papers' augmentation.

Augmentation is the one of ResNet (He et al. 2016, Sec. 4.2) used by every CIFAR paper after it:
4 pixels of zero padding on each side, a random 32x32 crop, a random horizontal flip, then per-channel
mean/std normalisation. Evaluation only normalises.

The data is read from `root/cifar-10-batches-py` (or `root/cifar-100-python`), the layout of the
official python archives. Nothing is downloaded unless `download=True`.
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lightcnn.data.base import ClassificationDataModule
from lightcnn.constants import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD


class _VerifiableMixin:
    """torchvision's CIFAR with the MD5 check made optional (`verify_md5=False` checks presence only)."""

    verify_md5: bool = True

    def _check_integrity(self) -> bool:
        return all(
            check_integrity(os.path.join(self.root, self.base_folder, name), md5 if self.verify_md5 else None)
            for name, md5 in self.train_list + self.test_list
        )

    def _load_meta(self) -> None:
        if not self.verify_md5:
            self.meta = {**self.meta, "md5": None}
        super()._load_meta()


class CIFAR10Dataset(_VerifiableMixin, datasets.CIFAR10):
    def __init__(self, *args, verify_md5: bool = True, **kwargs):
        self.verify_md5 = verify_md5
        super().__init__(*args, **kwargs)


class CIFAR100Dataset(_VerifiableMixin, datasets.CIFAR100):
    def __init__(self, *args, verify_md5: bool = True, **kwargs):
        self.verify_md5 = verify_md5
        super().__init__(*args, **kwargs)


def cifar_transforms(mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> v2.Compose:
    """Pad-4 random crop + horizontal flip (training, `augment=True`), then to float and normalise."""
    ops = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose([*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images of 10 classes, 32x32 RGB.

    Args:
        root: folder holding `cifar-10-batches-py/` (created there when `download=True`).
        batch_size: global batch size (all processes together).
        download: download and extract the archive into `root` if it is missing (needs the internet).
        val_size: images of the training set held out for validation (seeded by `split_seed`). With 0
            (the papers' protocol: train on all 50,000) the validation loader is the test set, so the
            validation curves are test curves.
        split_seed: seed of the train/val split.
        augment: the papers' pad-4 crop + flip on the training set.
        verify_md5: check the files' MD5 sums against the official archive's.
        num_workers: loader workers per process.
    """

    num_classes = 10
    in_chans = 3
    _dataset = CIFAR10Dataset
    _archive = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    _mean, _std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 128,
        download: bool = False,
        val_size: int = 0,
        split_seed: int = 0,
        augment: bool = True,
        verify_md5: bool = True,
        num_workers: int = 4,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.root, self.download, self.val_size, self.split_seed = root, download, val_size, split_seed
        self.augment, self.verify_md5 = augment, verify_md5

    def _make(self, train: bool, transform, download: bool = False):
        cls = self._dataset
        try:
            return cls(self.root, train=train, transform=transform, download=download, verify_md5=self.verify_md5)
        except RuntimeError as e:
            if "not found or corrupted" not in str(e):
                raise
            folder = os.path.join(self.root, cls.base_folder)
            raise FileNotFoundError(
                f"{cls.__name__.removesuffix('Dataset')} not found (or its files fail the MD5 check) in {folder}. "
                f"Either run once with --data.download true on a machine with internet access, or download "
                f"{self._archive} yourself and extract it into {self.root!r} (giving {folder}/), or point "
                f"--data.root at the folder that holds {cls.base_folder}/."
            ) from e

    def prepare_data(self) -> None:
        # Runs on one process per node: download here, never in setup (which every process runs).
        if self.download:
            for train in (True, False):
                self._make(train, None, download=True)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.test_set is not None:
            return
        eval_tf = cifar_transforms(self._mean, self._std, augment=False)
        train_tf = cifar_transforms(self._mean, self._std, augment=self.augment)
        train_full = self._make(True, train_tf)
        self.test_set = self._make(False, eval_tf)
        if self.val_size == 0:
            self.train_set, self.val_set = train_full, self.test_set
            return
        if self.val_size >= len(train_full):
            raise ValueError(f"val_size={self.val_size} leaves no training images (the set has {len(train_full)})")
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        self.train_set = Subset(train_full, order[self.val_size:])
        self.val_set = Subset(self._make(True, eval_tf), order[: self.val_size])  # same images, no augmentation


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100: the same protocol with 100 classes (the fine labels). Args as `CIFAR10DataModule`."""

    num_classes = 100
    _dataset = CIFAR100Dataset
    _archive = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    _mean, _std = CIFAR100_MEAN, CIFAR100_STD
