"""The uniform API every lightcnn network has, and the default configurations of the papers' data sets."""
from __future__ import annotations

import torch
from torch import nn

from lightcnn.constants import (  # noqa: F401  (re-exported until every caller imports lightcnn.constants)
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DATASETS, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN,
    IMAGENET_STD,
)


def make_default_cfg(dataset: str, num_classes: int, in_chans: int, input_size: int | tuple[int, int] | None = None,
                     **extra) -> dict:
    """The one way a model states what it expects: `{input_size: (C, H, W), mean, std, dataset, num_classes}`
    built from the model's real knobs. `dataset` names the paper's data set (a key of
    `lightcnn.constants.DATASETS`); its mean/std are used for 3-channel input (or digits' 1-channel), and
    0.5/0.5 per channel for any other channel count. `input_size` is the side (or (H, W)) the model is
    built for, the data set's native side by default. `extra` adds model-specific entries (e.g. crop_pct)."""
    if dataset not in DATASETS:
        raise ValueError(f"make_default_cfg: unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    facts = DATASETS[dataset]
    mean, std = facts["mean"], facts["std"]
    if len(mean) != in_chans:
        mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    side = facts["input_side"] if input_size is None else input_size
    hw = (side, side) if isinstance(side, int) else tuple(side)
    return dict(input_size=(in_chans, *hw), mean=tuple(mean), std=tuple(std), dataset=dataset,
                num_classes=num_classes, **extra)


def imagenet_cfg(input_size: int = 224, **kw) -> dict:
    return dict(input_size=(3, input_size, input_size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                dataset="imagenet", num_classes=1000, **kw)


def cifar_cfg(num_classes: int = 10, in_chans: int = 3, **kw) -> dict:
    """CIFAR-100's statistics for 100 classes, CIFAR-10's otherwise; mean/std 0.5 for non-RGB input."""
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if num_classes == 100 else (CIFAR10_MEAN, CIFAR10_STD)
    if in_chans != 3:
        mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    return dict(input_size=(in_chans, 32, 32), mean=mean, std=std,
                dataset="cifar100" if num_classes == 100 else "cifar10", num_classes=num_classes, **kw)


def init_he_fan_out_(model: nn.Module) -> None:
    """He-normal (fan_out) convolutions and identity BatchNorms, as the ResNet authors' code initialises."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Classifier(nn.Module):
    """Base of every network: `forward(x) == forward_head(forward_features(x))`.

    Subclasses set `num_classes`, `in_chans`, `num_features` (the classifier's input width) and
    `default_cfg`, and implement `forward_features` (the last feature map, before pooling) and
    `forward_head` (pooling, dropout, classifier; `pre_logits=True` stops before the classifier).
    Models with auxiliary heads override `forward` to return a named tuple while training.
    """

    num_classes: int
    in_chans: int
    num_features: int
    default_cfg: dict

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
