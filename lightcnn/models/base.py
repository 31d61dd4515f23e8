"""What every lightcnn network shares: the `Classifier` API, `make_default_cfg` and the He initialiser."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightcnn.constants import DATASETS


def make_default_cfg(dataset: str, num_classes: int, in_chans: int, input_size: int | tuple[int, int] | None = None,
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, **extra) -> dict:
    """The one way a model states what it expects: `{input_size: (C, H, W), mean, std, dataset, num_classes}`
    built from the model's real knobs; the data modules apply it unless a recipe says otherwise.

    `dataset` names the paper's data set (a key of `lightcnn.constants.DATASETS`), or "cifar" for the
    CIFAR nets, which take CIFAR-100 for 100 classes and CIFAR-10 otherwise. `input_size` is the side (or
    (H, W)) the model is built for, the data set's native side by default. `mean`/`std` are the data set's
    when they have `in_chans` entries, 0.5/0.5 per channel otherwise; a paper that prescribes its own
    input normalisation passes it (one value, repeated over the channels, or one per channel). `extra`
    adds model-specific entries (e.g. crop_pct)."""
    if dataset == "cifar":
        dataset = "cifar100" if num_classes == 100 else "cifar10"
    if dataset not in DATASETS:
        raise ValueError(f"make_default_cfg: unknown dataset {dataset!r}; known: cifar, {', '.join(DATASETS)}")
    facts = DATASETS[dataset]
    if (mean is None) != (std is None):
        raise ValueError("make_default_cfg: give both mean and std, or neither")
    if mean is None:
        mean, std = facts["mean"], facts["std"]
        if len(mean) != in_chans:
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    else:
        mean, std = (tuple(v) * in_chans if len(v) == 1 else tuple(v) for v in (mean, std))
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"make_default_cfg: mean {mean} / std {std} need 1 or {in_chans} values")
    side = facts["input_side"] if input_size is None else input_size
    hw = (side, side) if isinstance(side, int) else tuple(side)
    return dict(input_size=(in_chans, *hw), mean=tuple(mean), std=tuple(std), dataset=dataset,
                num_classes=num_classes, **extra)


@torch.no_grad()
def init_he_(model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_out") -> None:
    """He et al. 2015 ("Delving deep into rectifiers") normal init of every convolution, std sqrt(2 / fan),
    with zero conv biases and identity BatchNorms. `mode` is the fan the authors' code divides by: fan_out
    (k*k*out) in fb.resnet.torch and the pre-activation ResNet code, fan_in (k*k*in) in WRN's `MSRinit`
    and stochastic depth's `nninit.kaiming`."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Classifier(nn.Module):
    """Base of every network: `forward(x) == forward_head(forward_features(x))`.

    Subclasses set `num_classes`, `in_chans`, `num_features` (the classifier's input width) and
    `default_cfg` (with `make_default_cfg`), and implement `forward_features` (the last feature map, before
    pooling) and `forward_head` (pooling, dropout, classifier; `pre_logits=True` stops before the
    classifier). Models with auxiliary heads override `forward` to return a named tuple while training.
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
