"""ImageNet (ILSVRC-2012) from an ImageFolder tree, with the training augmentations of the papers.

Expected layout (the usual one; the validation images sorted into class folders, e.g. with the
widely used `valprep.sh`):

    root/train/n01440764/*.JPEG ... (1000 folders)
    root/val/n01440764/*.JPEG   ... (1000 folders, 50 images each)

ILSVRC's test labels are not public, so, as in the papers, the validation set is the test split.

Training augmentations (`augmentation`):
- "alexnet": shorter side to `resize_size`, a random `image_size` crop, horizontal flip
  (Krizhevsky et al. 2012, Sec. 4.1; the PCA colour jitter is not applied). ZFNet trains the same way.
- "scale": shorter side drawn uniformly from `scale_range`, a random crop, flip: VGG's scale jittering
  (Simonyan & Zisserman 2015, Sec. 3.1, S in [256, 512]) and ResNet's (He et al. 2016, Sec. 3.4, [256, 480]).
- "inception": a random crop of 8%-100% of the area with aspect ratio in [3/4, 4/3], resized to
  `image_size`, flip (Szegedy et al. 2015, Sec. 6).
Evaluation: shorter side to `resize_size`, centre crop of `image_size` (single crop).
"""
from __future__ import annotations

import os
from typing import Literal

import torch
from torchvision import datasets
from torchvision.transforms import v2

from lightcnn.data.base import ClassificationDataModule
from lightcnn.constants import IMAGENET_MEAN, IMAGENET_STD


def imagenet_transforms(
    augmentation: Literal["alexnet", "scale", "inception", "none"],
    image_size: int = 224,
    resize_size: int = 256,
    scale_range: tuple[int, int] = (256, 480),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> v2.Compose:
    """The training (`augmentation` != "none") or evaluation ("none") transform of an ImageNet image."""
    if augmentation == "alexnet":
        ops = [v2.Resize(resize_size), v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]
    elif augmentation == "scale":
        lo, hi = scale_range
        if not image_size <= lo <= hi:
            raise ValueError(f"scale_range must satisfy image_size <= low <= high, got {scale_range}")
        ops = [v2.RandomShortestSize(list(range(lo, hi + 1))), v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]
    elif augmentation == "inception":
        ops = [v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), v2.RandomHorizontalFlip()]
    elif augmentation == "none":
        ops = [v2.Resize(resize_size), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"augmentation must be 'alexnet', 'scale', 'inception' or 'none', got {augmentation!r}")
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet (or any ImageFolder tree with `train/` and `val/`), single-crop evaluation.

    Args:
        root: folder holding `train/` and `val/`, one subfolder per class in each.
        batch_size: global batch size (all processes together).
        augmentation: "alexnet", "scale" or "inception" (see the module docstring).
        image_size: side of the crops fed to the network (227 for the original AlexNet, 224 otherwise).
        resize_size: shorter side before the crop ("alexnet" training and evaluation).
        scale_range: range of the random shorter side for "scale".
        num_classes: class count the tree must have (checked at setup).
        num_workers: loader workers per process.
    """

    in_chans = 3

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        augmentation: Literal["alexnet", "scale", "inception"] = "inception",
        image_size: int = 224,
        resize_size: int = 256,
        scale_range: tuple[int, int] = (256, 480),
        num_classes: int = 1000,
        num_workers: int = 8,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if resize_size < image_size:
            raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
        self.root, self.augmentation, self.image_size = root, augmentation, image_size
        self.resize_size, self.scale_range, self.num_classes = resize_size, tuple(scale_range), num_classes
        imagenet_transforms(augmentation, image_size, resize_size, self.scale_range)  # validate the knobs now

    def _folder(self, split: str, transform) -> datasets.ImageFolder:
        path = os.path.join(self.root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"ImageNet split folder {path} does not exist. Download ILSVRC-2012 from "
                f"https://image-net.org (an account is needed), extract it as {self.root}/train/<wnid>/*.JPEG "
                f"and {self.root}/val/<wnid>/*.JPEG (sort the validation images into class folders, e.g. with "
                f"valprep.sh), or point --data.root at such a tree."
            )
        ds = datasets.ImageFolder(path, transform=transform)
        if len(ds.classes) != self.num_classes:
            raise ValueError(
                f"{path} has {len(ds.classes)} class folders but num_classes={self.num_classes}; "
                f"set --data.num_classes {len(ds.classes)} or fix the tree"
            )
        return ds

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.test_set is not None:
            return
        eval_tf = imagenet_transforms("none", self.image_size, self.resize_size)
        train_tf = imagenet_transforms(self.augmentation, self.image_size, self.resize_size, self.scale_range)
        self.train_set = self._folder("train", train_tf)
        self.val_set = self.test_set = self._folder("val", eval_tf)
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(f"{self.root}/train and {self.root}/val have different class folders")
