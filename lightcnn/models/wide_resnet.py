"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide residual networks"), CIFAR form.

WRN-d-k is a configuration of the pre-activation ResNet (`preact_resnet.PreActResNet`): a 3x3 stem conv
to 16 channels, three groups of n = (d - 4) / 6 pre-activation basic blocks of widths 16k, 32k, 64k
(strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear classifier. A block is
BN-ReLU-conv3x3-BN-ReLU-Dropout-conv3x3 (section 2, "B(3,3)"; dropout between the convs, after the
second ReLU, as in section 2.4 and the authors' `wide-resnet.lua`); when the width or resolution changes,
the first BN-ReLU is shared by the branch and the 1x1 projection shortcut, as in the authors' code.
The authors' `MSRinit` draws the convolutions He-normal over the fan-in and zeroes the classifier bias; the
BatchNorms keep Torch7's own reset, scale U(0, 1) and shift 0 (`bn_weight_init="uniform"`, the default here;
the paper says nothing of it), where PyTorch and the other lightcnn networks start the scale at 1
(`bn_weight_init="ones"`).
No difference to the pre-activation ResNet remains beyond these knobs, so there is no class of its own.

`create("wrn28_10")`, or any depth/width through the name pattern: `create("wrn10_1", in_chans=1)`.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightcnn.models.preact_resnet import PreActResNet
from lightcnn.models.registry import register_model, register_model_pattern

WRN = dict(block="basic", stem_width=16, he_fan_mode="fan_in")


BNWeightInit = Literal["uniform", "ones"]


@torch.no_grad()
def init_bn_weight_(model: nn.Module, bn_weight_init: BNWeightInit) -> nn.Module:
    """"uniform": every BatchNorm's scale drawn from U(0, 1), as Torch7's `BatchNormalization:reset()` (nn and
    cudnn) leaves it in code that never re-initialises BN (WRN's `wide-resnet.lua`, stochastic depth's
    `ResidualDrop.lua`); "ones": left at 1. Shifts stay 0. Returns the model."""
    if bn_weight_init not in ("uniform", "ones"):
        raise ValueError(f"bn_weight_init must be 'uniform' (Torch7's reset) or 'ones', got {bn_weight_init!r}")
    if bn_weight_init == "uniform":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.uniform_(0.0, 1.0)
    return model


def wrn_args(depth: int, widen_factor: int) -> dict:
    """PreActResNet's arguments for WRN-depth-widen_factor."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WRN: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"WRN: widen_factor must be >= 1, got {widen_factor}")
    n = (depth - 4) // 6
    return dict(WRN, layers=(n, n, n), widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor))


@register_model_pattern(r"wrn(\d+)_(\d+)", example="wrn16_4 (WRN-16-4)")
def wide_resnet(depth: int, widen_factor: int, bn_weight_init: BNWeightInit = "uniform", **kwargs) -> PreActResNet:
    """WRN-depth-widen_factor from its name, e.g. `create("wrn22_8")`."""
    model_args = wrn_args(depth, widen_factor)
    return init_bn_weight_(PreActResNet(**dict(model_args, **kwargs)), bn_weight_init)


@register_model
def wrn28_10(bn_weight_init: BNWeightInit = "uniform", **kwargs) -> PreActResNet:
    """WRN-28-10, the paper's best CIFAR net (4.00% / 19.25% error; 3.89% / 18.85% with dropout 0.3)."""
    model_args = wrn_args(28, 10)
    return init_bn_weight_(PreActResNet(**dict(model_args, **kwargs)), bn_weight_init)


@register_model
def wrn16_8(bn_weight_init: BNWeightInit = "uniform", **kwargs) -> PreActResNet:
    """WRN-16-8 (paper, table 4)."""
    model_args = wrn_args(16, 8)
    return init_bn_weight_(PreActResNet(**dict(model_args, **kwargs)), bn_weight_init)


@register_model
def wrn40_4(bn_weight_init: BNWeightInit = "uniform", **kwargs) -> PreActResNet:
    """WRN-40-4 (paper, table 4)."""
    model_args = wrn_args(40, 4)
    return init_bn_weight_(PreActResNet(**dict(model_args, **kwargs)), bn_weight_init)
