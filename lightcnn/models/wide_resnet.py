"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide residual networks"), CIFAR form.

WRN-d-k is a configuration of the pre-activation ResNet (`preact_resnet.PreActResNet`): a 3x3 stem conv
to 16 channels, three groups of n = (d - 4) / 6 pre-activation basic blocks of widths 16k, 32k, 64k
(strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear classifier. A block is
BN-ReLU-conv3x3-BN-ReLU-Dropout-conv3x3 (section 2, "B(3,3)"; dropout between the convs, after the
second ReLU, as in section 2.4 and the authors' `wide-resnet.lua`); when the width or resolution changes,
the first BN-ReLU is shared by the branch and the 1x1 projection shortcut, as in the authors' code.
The authors' `MSRinit` draws the convolutions He-normal over the fan-in and zeroes the classifier bias.
No difference to the pre-activation ResNet remains beyond these knobs, so there is no class of its own.

`create("wrn28_10")`, or any depth/width through the name pattern: `create("wrn10_1", in_chans=1)`.
"""
from __future__ import annotations

from lightcnn.models.preact_resnet import PreActResNet
from lightcnn.models.registry import register_model, register_model_pattern

WRN = dict(block="basic", stem_width=16, he_fan_mode="fan_in")


def wrn_args(depth: int, widen_factor: int) -> dict:
    """PreActResNet's arguments for WRN-depth-widen_factor."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WRN: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"WRN: widen_factor must be >= 1, got {widen_factor}")
    n = (depth - 4) // 6
    return dict(WRN, layers=(n, n, n), widths=(16 * widen_factor, 32 * widen_factor, 64 * widen_factor))


@register_model_pattern(r"wrn(\d+)_(\d+)", example="wrn16_4 (WRN-16-4)")
def wide_resnet(depth: int, widen_factor: int, **kwargs) -> PreActResNet:
    """WRN-depth-widen_factor from its name, e.g. `create("wrn22_8")`."""
    model_args = wrn_args(depth, widen_factor)
    return PreActResNet(**dict(model_args, **kwargs))


@register_model
def wrn28_10(**kwargs) -> PreActResNet:
    """WRN-28-10, the paper's best CIFAR net (4.00% / 19.25% error; 3.89% / 18.85% with dropout 0.3)."""
    model_args = wrn_args(28, 10)
    return PreActResNet(**dict(model_args, **kwargs))


@register_model
def wrn16_8(**kwargs) -> PreActResNet:
    """WRN-16-8 (paper, table 4)."""
    model_args = wrn_args(16, 8)
    return PreActResNet(**dict(model_args, **kwargs))


@register_model
def wrn40_4(**kwargs) -> PreActResNet:
    """WRN-40-4 (paper, table 4)."""
    model_args = wrn_args(40, 4)
    return PreActResNet(**dict(model_args, **kwargs))
