"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) through torchvision, with the papers' augmentation.

Augmentation is the one of ResNet (He et al. 2016, Sec. 4.2) used by every CIFAR paper after it:
per-channel mean/std normalisation, 4 pixels of padding on each side, a random 32x32 crop, a random
horizontal flip. Evaluation only normalises. `padding_mode` says what the padding holds, and each
recipe says which its paper used:
- "zero": black pixels (torchvision's `RandomCrop(32, padding=4)` on the raw image, most PyTorch codes);
- "mean": the data set's mean colour, i.e. zeros of the normalised image: the ResNet paper subtracts the
  mean before padding (Sec. 4.2), and fb.resnet.torch with the codes built on it (pre-activation
  ResNet, ResNeXt, DenseNet) and the stochastic-depth code normalise first, then zero-pad;
- "reflect": a mirror image of the border (the WRN authors' `randomcrop_type=reflection`).
`cutout=L` adds Cutout (DeVries & Taylor 2017): one LxL square, centred at a random pixel and clipped
at the border, is zeroed after normalisation (so it holds the data set's mean).

The data is read from `root/cifar-10-batches-py` (or `root/cifar-100-python`), the layout of the
official python archives. Nothing is downloaded unless `download=True`.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
from torch import nn
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lightcnn.constants import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from lightcnn.data.base import AutoAugment, ClassificationDataModule, augment_ops, erasing_ops


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


class Cutout(nn.Module):
    """Cutout (DeVries & Taylor 2017, Sec. 3): zero one `length` x `length` square of a (C, H, W) tensor,
    centred at a pixel drawn uniformly from the whole image, so that the square may cross the border
    (then only its part inside the image is zeroed), as the authors' code does. Uses torch's global RNG."""

    def __init__(self, length: int):
        super().__init__()
        if length < 1:
            raise ValueError(f"cutout length must be a positive number of pixels, got {length}")
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.length // 2
        x = x.clone()
        x[..., max(cy - half, 0):min(cy - half + self.length, h), max(cx - half, 0):min(cx - half + self.length, w)] = 0
        return x


PaddingMode = Literal["zero", "mean", "reflect"]


def cifar_transforms(mean: tuple[float, ...], std: tuple[float, ...], augment: bool,
                     padding_mode: PaddingMode = "zero", cutout: int = 0, auto_augment: AutoAugment = "none",
                     random_erasing: float = 0.0) -> v2.Compose:
    """To float and normalise; for training (`augment=True`) then a pad-4 random crop and a horizontal
    flip, then Cutout of side `cutout` (0: none). Cropping after normalising lets "mean" padding be the
    zeros of the normalised image, as in the Torch codes that normalised first. `auto_augment` (on the
    uint8 image, before normalising) and `random_erasing` (last) are the modern knobs, off by default."""
    fills = {"zero": [-m / s for m, s in zip(mean, std)], "mean": 0.0}  # black, or the mean colour
    if padding_mode not in ("zero", "mean", "reflect"):
        raise ValueError(f"padding_mode must be 'zero', 'mean' or 'reflect', got {padding_mode!r}")
    policy, erase = augment_ops(auto_augment, "cifar10"), erasing_ops(random_erasing)
    ops = [v2.ToImage(), *(policy if augment else []), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment:
        pad = dict(padding_mode="reflect") if padding_mode == "reflect" else dict(fill=fills[padding_mode])
        ops += [v2.RandomCrop(32, padding=4, **pad), v2.RandomHorizontalFlip()]
        ops += [Cutout(cutout)] if cutout else []
        ops += erase
    return v2.Compose(ops)


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
        padding_mode: what the pad-4 crop's padding holds: "zero" (black), "mean" (the mean colour) or
            "reflect" (a mirror of the border); see the module docstring for which paper used which.
        cutout: side of the Cutout square applied to training images (DeVries & Taylor 2017: 16 on
            CIFAR-10, 8 on CIFAR-100); 0 turns it off. Needs `augment`.
        mean: per-channel normalisation mean; None: the network's `default_cfg`, else the data set's.
        std: per-channel normalisation std; None as `mean`.
        verify_md5: check the files' MD5 sums against the official archive's.
        num_workers: loader workers per process.
        auto_augment: "randaugment", "trivialaugment" or "autoaugment" (CIFAR-10 policy) on training
            images; "none" (the papers). Needs `augment`.
        random_erasing: probability of Random Erasing on a training image; 0 (the papers). Needs `augment`.

    The images stay 32x32 whatever the network's `default_cfg` says (no paper resizes CIFAR).
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
        padding_mode: PaddingMode = "zero",
        cutout: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        verify_md5: bool = True,
        num_workers: int = 4,
        auto_augment: AutoAugment = "none",
        random_erasing: float = 0.0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if cutout < 0:
            raise ValueError(f"cutout must be >= 0 (0 turns it off), got {cutout}")
        if cutout and not augment:
            raise ValueError("cutout is a training augmentation: it needs augment=true")
        if (auto_augment != "none" or random_erasing) and not augment:
            raise ValueError("auto_augment and random_erasing are training augmentations: they need augment=true")
        cifar_transforms(self._mean, self._std, augment, padding_mode, cutout, auto_augment, random_erasing)
        self.auto_augment, self.random_erasing = auto_augment, random_erasing
        self.root, self.download, self.val_size, self.split_seed = root, download, val_size, split_seed
        self.augment, self.padding_mode, self.cutout, self.verify_md5 = augment, padding_mode, cutout, verify_md5
        self.mean, self.std = mean, std

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
        cfg = self.resolve_data_config(dict(mean=self._mean, std=self._std), mean=self.mean, std=self.std)
        eval_tf = cifar_transforms(cfg["mean"], cfg["std"], augment=False)
        train_tf = cifar_transforms(cfg["mean"], cfg["std"], self.augment, self.padding_mode, self.cutout,
                                    self.auto_augment, self.random_erasing)
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
