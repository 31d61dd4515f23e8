"""ResNeXt (Xie, Girshick, Dollar, Tu, He 2017, "Aggregated Residual Transformations for Deep Neural Networks").

A ResNet (`resnet.ResNet`) whose bottleneck 3x3 conv is split into `cardinality` groups (the paper's form
(c), Fig. 3), each `base_width` (d) channels wide in the first stage, doubling per stage; the stride sits
in the grouped 3x3 (the authors' code, = torchvision's v1.5). The ImageNet models are torchvision's layout
exactly; the CIFAR ResNeXt-29 (Section 5.3) has a 64-channel 3x3 stem and three stages of three blocks
with 256/512/1024 output channels. Builders only: every knob is `ResNet`'s.
"""
from __future__ import annotations

from lightcnn.models.registry import register_model
from lightcnn.models.resnet import ResNet, convert_torchvision_state_dict
from lightcnn.models.weights import register_twin

RESNEXT = dict(block="bottleneck", stride_in_1x1=False)
# Section 5.3: 29 layers = 3 stages x 3 bottlenecks x 3 convs + stem + fc; outputs 256/512/1024.
CIFAR_RESNEXT = dict(RESNEXT, layers=(3, 3, 3), widths=(64, 128, 256), stem="cifar", stem_width=64, num_classes=10)


@register_model
def resnext29_8x64d(**kwargs) -> ResNet:
    """ResNeXt-29 8x64d (CIFAR); paper error 3.65% (C100 17.77%)."""
    model_args = dict(CIFAR_RESNEXT, cardinality=8, base_width=64)
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnext29_16x64d(**kwargs) -> ResNet:
    """ResNeXt-29 16x64d (CIFAR); paper error 3.58% (C100 17.31%)."""
    model_args = dict(CIFAR_RESNEXT, cardinality=16, base_width=64)
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 32x4d (ImageNet, 3-4-6-3); torchvision's layout."""
    model_args = dict(RESNEXT, layers=(3, 4, 6, 3), cardinality=32, base_width=4)
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 32x8d (ImageNet, 3-4-23-3); torchvision's layout."""
    model_args = dict(RESNEXT, layers=(3, 4, 23, 3), cardinality=32, base_width=8)
    return ResNet(**dict(model_args, **kwargs))


register_twin("torchvision", "resnext50_32x4d", convert_torchvision_state_dict)
register_twin("torchvision", "resnext101_32x8d", convert_torchvision_state_dict)
