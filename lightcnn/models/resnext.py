"""ResNeXt (Xie, Girshick, Dollar, Tu, He 2017, "Aggregated Residual Transformations for Deep Neural Networks").

A ResNet whose bottleneck 3x3 conv is split into `cardinality` groups (the paper's form (c), Fig. 3),
each `d` channels wide in the first stage (`base_width`), doubling per stage; the stride sits in the
grouped 3x3 (the authors' code, = torchvision's v1.5). The ImageNet models are torchvision's layout
exactly; the CIFAR ResNeXt-29 (Section 5.3) has a 64-channel 3x3 stem and three stages of three blocks
with 256/512/1024 output channels.
"""
from __future__ import annotations

from typing import Literal, Sequence

from lightcnn.models.registry import register_model
from lightcnn.models.resnet import ResNet


class ResNeXt(ResNet):
    """ResNeXt: ResNet with aggregated (grouped) bottleneck transformations.

    Args:
        layers: bottleneck blocks per stage (ImageNet ResNeXt-50: 3-4-6-3; CIFAR ResNeXt-29: 3-3-3).
        cardinality: the number of groups C (paper's "32x4d" has C = 32).
        base_width: the bottleneck width d of one group in the first stage (paper's "32x4d": d = 4);
            the grouped conv is `C * d * widths[i] / 64` wide.
        num_classes: classifier outputs (1000 for ImageNet, 10 for CIFAR-10).
        in_chans: input image channels.
        widths: `planes` of each stage; a block outputs 4x that.
        stem: "imagenet" (7x7/2 conv + max-pool) or "cifar" (3x3 conv).
        stem_width: output channels of the stem conv.
        shortcut: "B" projection where shapes change (the paper), "C" projection everywhere, "A" zero-pad.
        stride_in_1x1: False (default): the stride is in the grouped 3x3, as in the authors' code.
        zero_init_residual: start each block's last BN at gamma = 0.
        p_L: stochastic-depth survival probability of the last block (1.0: off, the paper).
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        cardinality: int = 32,
        base_width: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: Literal["imagenet", "cifar"] = "imagenet",
        stem_width: int = 64,
        shortcut: Literal["A", "B", "C"] = "B",
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
        p_L: float = 1.0,
    ):
        super().__init__(block="bottleneck", layers=layers, num_classes=num_classes, in_chans=in_chans,
                         widths=widths, stem=stem, stem_width=stem_width, shortcut=shortcut,
                         stride_in_1x1=stride_in_1x1, cardinality=cardinality, base_width=base_width,
                         zero_init_residual=zero_init_residual, p_L=p_L)


def _cifar_resnext(cardinality: int, base_width: int, **kwargs) -> ResNeXt:
    # Section 5.3: 29 layers = 3 stages x 3 bottlenecks x 3 convs + stem + fc; outputs 256/512/1024.
    args = dict(layers=(3, 3, 3), cardinality=cardinality, base_width=base_width, widths=(64, 128, 256),
                stem="cifar", stem_width=64, num_classes=10)
    return ResNeXt(**dict(args, **kwargs))


@register_model
def resnext29_8x64d(**kwargs) -> ResNeXt:
    """ResNeXt-29 8x64d (CIFAR): 34,426,698 parameters, 5.387 GMACs; paper error 3.65% (C100 17.77%)."""
    return _cifar_resnext(8, 64, **kwargs)


@register_model
def resnext29_16x64d(**kwargs) -> ResNeXt:
    """ResNeXt-29 16x64d (CIFAR): 68,155,210 parameters, 10.689 GMACs; paper error 3.58% (C100 17.31%)."""
    return _cifar_resnext(16, 64, **kwargs)


@register_model
def resnext50_32x4d(**kwargs) -> ResNeXt:
    """ResNeXt-50 32x4d (ImageNet, 3-4-6-3): 25,028,904 parameters, 4.230 GMACs; torchvision's layout."""
    return ResNeXt(**dict(dict(layers=(3, 4, 6, 3), cardinality=32, base_width=4), **kwargs))


@register_model
def resnext101_32x8d(**kwargs) -> ResNeXt:
    """ResNeXt-101 32x8d (ImageNet, 3-4-23-3): 88,791,336 parameters, 16.414 GMACs; torchvision's layout."""
    return ResNeXt(**dict(dict(layers=(3, 4, 23, 3), cardinality=32, base_width=8), **kwargs))
