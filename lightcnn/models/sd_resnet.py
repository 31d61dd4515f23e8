"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger 2016, "Deep Networks with Stochastic Depth").

A ResNet (`resnet.ResNet` with `p_L < 1`) trained with randomly dropped residual blocks: block l survives
a mini-batch with probability p_l = 1 - l / L * (1 - p_L) (linear decay, p_L = 0.5), one gate per block
per mini-batch; a dropped block is the identity (its branch is not even computed), and at test time
every branch is scaled by its p_l. The gate lives in `resnet.py`'s blocks and acts only in training mode.
Builders only: every knob is `ResNet`'s.

* `sd_resnet110`, `sd_resnet1202` (CIFAR): the authors' Torch code (main.lua, ResidualDrop.lua): 6n+2
  layers, every conv with a bias, shortcuts that average-pool 2x2/2 and append zero channels, and
  `nninit.kaiming` (He normal over the fan-in) for the convolutions. ResNet-110's parameters plus one
  conv bias per output channel. The BatchNorms keep Torch7's reset there, scale U(0, 1) and shift 0
  (`bn_weight_init="uniform"`, the default of these two builders; "ones" starts the scale at 1).
* `sd_resnet152` (ImageNet, Section 4): ResNet-152 as in fb.resnet.torch, which the authors built on:
  projection shortcuts, no conv biases, the stride in the bottleneck's 3x3 (v1.5), He init over the
  fan-out: the same architecture as torchvision's resnet152, whose weights load into it when it is built
  with `p_L=1.0` (stochastic depth's eval-time scaling is not in torchvision's network).
"""
from __future__ import annotations

from lightcnn.models.registry import register_model
from lightcnn.models.resnet import CIFAR_RESNET, ResNet, convert_torchvision_state_dict
from lightcnn.models.weights import register_twin
from lightcnn.models.wide_resnet import BNWeightInit, init_bn_weight_

CIFAR_SD_RESNET = dict(CIFAR_RESNET, shortcut_pool="avg", conv_bias=True, p_L=0.5, he_fan_mode="fan_in")


def _cifar(model: ResNet, bn_weight_init: BNWeightInit, kwargs: dict) -> ResNet:
    if bn_weight_init == "uniform" and kwargs.get("zero_init_residual"):
        raise ValueError("zero_init_residual=True needs bn_weight_init='ones' (the uniform draw would overwrite "
                         "the zero scales)")
    return init_bn_weight_(model, bn_weight_init)


@register_model
def sd_resnet110(bn_weight_init: BNWeightInit = "uniform", **kwargs) -> ResNet:
    """Stochastic-depth ResNet-110 (CIFAR, n = 18, p_L = 0.5); paper error 5.25% (C100 24.98%)."""
    model_args = dict(CIFAR_SD_RESNET, layers=(18, 18, 18))
    return _cifar(ResNet(**dict(model_args, **kwargs)), bn_weight_init, kwargs)


@register_model
def sd_resnet1202(bn_weight_init: BNWeightInit = "uniform", **kwargs) -> ResNet:
    """Stochastic-depth ResNet-1202 (CIFAR, n = 200, p_L = 0.5): the authors' CIFAR code at `-N 200`;
    paper error 4.91%."""
    model_args = dict(CIFAR_SD_RESNET, layers=(200, 200, 200))
    return _cifar(ResNet(**dict(model_args, **kwargs)), bn_weight_init, kwargs)


@register_model
def sd_resnet152(**kwargs) -> ResNet:
    """Stochastic-depth ResNet-152 (ImageNet, p_L = 0.5), fb.resnet.torch's v1.5 layout."""
    model_args = dict(block="bottleneck", layers=(3, 8, 36, 3), stride_in_1x1=False, p_L=0.5)
    return ResNet(**dict(model_args, **kwargs))


register_twin("torchvision", "sd_resnet152", convert_torchvision_state_dict)
