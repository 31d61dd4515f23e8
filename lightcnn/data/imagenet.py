"""ImageNet (ILSVRC-2012) from an ImageFolder tree, with the training augmentations of the papers.

Expected layout (the usual one; the validation images sorted into class folders, e.g. with the
widely used `valprep.sh`):

    root/train/n01440764/*.JPEG ... (1000 folders)
    root/val/n01440764/*.JPEG   ... (1000 folders, 50 images each)

ILSVRC's test labels are not public, so, as in the papers, the validation set is the test split.

Training augmentations (`augmentation`):
- "alexnet": shorter side to `resize_size`, a random `image_size` crop, horizontal flip
  (Krizhevsky et al. 2012, Sec. 4.1; the PCA colour jitter is not applied). ZFNet trains the same way.
  With `center_square=True` the crops are taken inside the central `resize_size` square only, as both
  papers did (AlexNet Sec. 2: "cropped out the central 256x256 patch"; ZFNet Sec. 3.1); without it,
  anywhere in the resized image (the common reproductions' choice).
- "scale": shorter side drawn uniformly from `scale_range`, a random crop, flip: VGG's scale jittering
  (Simonyan & Zisserman 2015, Sec. 3.1, S in [256, 512]) and ResNet's (He et al. 2016, Sec. 3.4, [256, 480]).
- "inception": a random crop of 8%-100% of the area with aspect ratio in [3/4, 4/3], resized to
  `image_size`, flip (Szegedy et al. 2015, Sec. 6). `crop_scale_min` moves the 8% (TF-slim's
  inception_preprocessing draws from 5%).
Colour noise on top of any training augmentation (off by default): `color_jitter` scales brightness,
contrast and saturation by factors in [1 - c, 1 + c], in random order (fb.resnet.torch's ColorJitter, c=0.4);
`lighting` adds AlexNet's PCA lighting noise, alpha ~ N(0, lighting) per eigenvector of ImageNet's RGB
covariance (Krizhevsky et al. 2012, Sec. 4.1; fb.resnet.torch's Lighting, 0.1). Both act on the [0, 1]
image before normalisation, as in fb.resnet.torch.
Evaluation: shorter side to `resize_size`, centre crop of `image_size` (single crop).

`image_size`, `mean` and `std` default to the network's `default_cfg` (see `base.py`), and
`resize_size` to `image_size / crop_pct` (the cfg's `crop_pct`, else 0.875: 256 for 224).

Any folder of your own images in this layout trains the same way (`root/train/<class>/*`,
`root/val/<class>/*`): `num_classes` left out is the number of class folders, and the class names (the
folder names) are kept in the run's checkpoints. `auto_augment` and `random_erasing` add the modern
augmentations (`base.augment_ops`, `base.erasing_ops`) to the training transform.
"""
from __future__ import annotations

import math
import os
from typing import Literal

import torch
from torchvision import datasets
from torchvision.transforms import v2

from lightcnn.constants import DATASETS, IMAGENET_MEAN, IMAGENET_STD
from lightcnn.data.base import AutoAugment, ClassificationDataModule, UnreadableDataError, augment_ops, erasing_ops

DEFAULT_CROP_PCT = 0.875  # 224 / 256: the evaluation crop of AlexNet, VGG and ResNet
# ImageNet's RGB covariance, as fb.resnet.torch's Lighting uses it: eigenvalues and eigenvectors (columns)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class Lighting(torch.nn.Module):
    """AlexNet's PCA lighting noise on a float (3, H, W) image: adds eigvec @ (alpha * eigval) to every pixel,
    alpha ~ N(0, std) drawn per image."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std
        self.register_buffer("eigval", torch.tensor(PCA_EIGVAL), persistent=False)
        self.register_buffer("eigvec", torch.tensor(PCA_EIGVEC), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return img
        alpha = torch.randn(3) * self.std
        return img + (self.eigvec @ (alpha * self.eigval)).to(img.dtype).view(3, 1, 1)



def load_image(path: str):
    """torchvision's PIL loader (RGB), with a file that cannot be decoded named in the error."""
    try:
        return datasets.folder.pil_loader(path)
    except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated or not an image
        raise UnreadableDataError(
            f"{path} cannot be read as an image ({e}): the file is truncated or corrupt. Replace it with an "
            f"intact copy (e.g. from the original archive) or delete it, then run again."
        ) from e


def imagenet_transforms(
    augmentation: Literal["alexnet", "scale", "inception", "none"],
    image_size: int = 224,
    resize_size: int = 256,
    scale_range: tuple[int, int] = (256, 480),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    center_square: bool = False,
    auto_augment: AutoAugment = "none",
    random_erasing: float = 0.0,
    crop_scale_min: float = 0.08,
    color_jitter: float = 0.0,
    lighting: float = 0.0,
) -> v2.Compose:
    """The training (`augmentation` != "none") or evaluation ("none") transform of an ImageNet image;
    training adds `auto_augment` after the crop and flip, colour jitter and `lighting` noise on the [0, 1]
    image, and `random_erasing` after normalising."""
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must be in (0, 1] (a fraction of the image area), got {crop_scale_min}")
    if crop_scale_min != 0.08 and augmentation not in ("inception", "none"):
        raise ValueError(f"crop_scale_min is the 'inception' crop's smallest area; augmentation is {augmentation!r}")
    if not (0.0 <= color_jitter < 1.0 and lighting >= 0.0):
        raise ValueError(f"color_jitter must be in [0, 1) and lighting >= 0, got {color_jitter} and {lighting}")
    if resize_size < image_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
    if center_square and augmentation not in ("alexnet", "none"):
        raise ValueError(
            f"center_square is the AlexNet/ZFNet crop: it needs augmentation='alexnet', got {augmentation!r}")
    if augmentation == "alexnet":
        square = [v2.CenterCrop(resize_size)] if center_square else []
        ops = [v2.Resize(resize_size), *square, v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]
    elif augmentation == "scale":
        lo, hi = scale_range
        if not image_size <= lo <= hi:
            raise ValueError(f"scale_range must satisfy image_size <= low <= high, got {scale_range}")
        ops = [v2.RandomShortestSize(list(range(lo, hi + 1))), v2.RandomCrop(image_size), v2.RandomHorizontalFlip()]
    elif augmentation == "inception":
        ops = [v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), ratio=(3 / 4, 4 / 3)),
               v2.RandomHorizontalFlip()]
    elif augmentation == "none":
        ops = [v2.Resize(resize_size), v2.CenterCrop(image_size)]
    else:
        raise ValueError(f"augmentation must be 'alexnet', 'scale', 'inception' or 'none', got {augmentation!r}")
    extra, erase, colour = augment_ops(auto_augment), erasing_ops(random_erasing), []
    if augmentation == "none":
        extra, erase = [], []
    if augmentation != "none" and color_jitter:
        colour.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if augmentation != "none" and lighting:
        colour.append(Lighting(lighting))
    return v2.Compose([v2.ToImage(), *ops, *extra, v2.ToDtype(torch.float32, scale=True), *colour,
                       v2.Normalize(mean, std), *erase])


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet (or any ImageFolder tree with `train/` and `val/`), single-crop evaluation.

    Args:
        root: folder holding `train/` and `val/`, one subfolder per class in each.
        batch_size: global batch size (all processes together).
        augmentation: "alexnet", "scale" or "inception" (see the module docstring).
        image_size: side of the crops fed to the network (227 for the original AlexNet, 224 otherwise);
            None: the network's input side.
        resize_size: shorter side before the crop ("alexnet" training and evaluation); None:
            `image_size / crop_pct` (the network's `crop_pct`, else 0.875).
        scale_range: range of the random shorter side for "scale".
        center_square: "alexnet" only: crop inside the central `resize_size` square, as the AlexNet and
            ZFNet papers did.
        crop_scale_min: "inception" only: the smallest crop area, a fraction of the image (0.08; TF-slim 0.05).
        color_jitter: brightness/contrast/saturation strength c, factors in [1 - c, 1 + c] (0: off;
            fb.resnet.torch 0.4).
        lighting: std of AlexNet's PCA lighting noise (0: off; AlexNet and fb.resnet.torch 0.1).
        mean: per-channel normalisation mean; None: the network's `default_cfg`, else ImageNet's.
        std: per-channel normalisation std; None as `mean`.
        num_classes: class count the tree must have (checked at setup); None: the number of class folders
            in `root/train` (1000 when the folder is missing).
        num_workers: loader workers per process.
        auto_augment: "randaugment", "trivialaugment" or "autoaugment" (ImageNet policy) on training
            images; "none" (the papers).
        random_erasing: probability of Random Erasing on a training image; 0 (the papers) turns it off.
    """

    in_chans = 3

    def __init__(
        self,
        root: str = "data/imagenet",
        batch_size: int = 256,
        augmentation: Literal["alexnet", "scale", "inception"] = "inception",
        image_size: int | None = None,
        resize_size: int | None = None,
        scale_range: tuple[int, int] = (256, 480),
        center_square: bool = False,
        crop_scale_min: float = 0.08,
        color_jitter: float = 0.0,
        lighting: float = 0.0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        num_classes: int | None = None,
        num_workers: int = 8,
        auto_augment: AutoAugment = "none",
        random_erasing: float = 0.0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.root, self.augmentation, self.image_size = root, augmentation, image_size
        self.class_names = self._class_folders()
        if num_classes is None:
            num_classes = len(self.class_names) if self.class_names else 1000
        self.resize_size, self.scale_range, self.num_classes = resize_size, tuple(scale_range), num_classes
        self.auto_augment, self.random_erasing = auto_augment, random_erasing
        self.center_square, self.mean, self.std = center_square, mean, std
        self.colour = dict(crop_scale_min=crop_scale_min, color_jitter=color_jitter, lighting=lighting)
        # Check the knobs the recipe sets now (an unset size counts as 1 px, which passes every check);
        # setup checks again once the sizes are resolved against the network.
        imagenet_transforms(augmentation, image_size or 1, resize_size or image_size or 1, self.scale_range,
                            center_square=center_square, auto_augment=auto_augment, random_erasing=random_erasing,
                            **self.colour)

    def _class_folders(self) -> list[str] | None:
        """The class folders of `root/train`, sorted as ImageFolder sorts them (None without the folder)."""
        path = os.path.join(self.root, "train")
        return datasets.folder.find_classes(path)[0] if os.path.isdir(path) else None

    def _transforms(self) -> tuple[v2.Compose, v2.Compose]:
        """(training, evaluation) transforms with the sizes and normalisation resolved against the network."""
        facts = DATASETS["imagenet"]
        cfg = self.resolve_data_config(
            dict(image_size=facts["input_side"], mean=facts["mean"], std=facts["std"], crop_pct=DEFAULT_CROP_PCT),
            image_size=self.image_size, mean=self.mean, std=self.std)
        size = cfg["image_size"]
        resize = self.resize_size or math.floor(size / cfg["crop_pct"])
        norm = dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
        self._resolved["resize_size"] = resize
        train = imagenet_transforms(self.augmentation, size, resize, self.scale_range, **norm,
                                    center_square=self.center_square, auto_augment=self.auto_augment,
                                    random_erasing=self.random_erasing, **self.colour)
        return train, imagenet_transforms("none", size, resize, **norm)

    def _folder(self, split: str, transform) -> datasets.ImageFolder:
        path = os.path.join(self.root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"ImageNet split folder {path} does not exist. Download ILSVRC-2012 from "
                f"https://image-net.org (an account is needed), extract it as {self.root}/train/<wnid>/*.JPEG "
                f"and {self.root}/val/<wnid>/*.JPEG (sort the validation images into class folders, e.g. with "
                f"valprep.sh), or point --data.root at such a tree."
            )
        ds = datasets.ImageFolder(path, transform=transform, loader=load_image)
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
        train_tf, eval_tf = self._transforms()
        self.train_set = self._folder("train", train_tf)
        self.val_set = self.test_set = self._folder("val", eval_tf)
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(f"{self.root}/train and {self.root}/val have different class folders")
        self.class_names = list(self.train_set.classes)
