"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide residual networks"), CIFAR form.

WRN-d-k: a 3x3 stem conv to 16 channels, three groups of n = (d - 4) / 6 pre-activation basic blocks of
widths 16k, 32k, 64k (strides 1, 2, 2), a final BN-ReLU, global average pooling and a linear classifier.
A block is BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 (section 2, "B(3,3)"; dropout between the convs as in
section 2.4); when the width or resolution changes, the first BN-ReLU is shared by the branch and the
1x1 projection shortcut, as in the authors' code. Every BN-ReLU-conv unit is a `PreActConv2d` (the fused
kernel); `impl="reference"` runs the same network on the unfused PyTorch sequence.

`create("wrn28_10")`, or any depth/width through the name pattern: `create("wrn10_1", in_chans=1)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.layers import PreActConv2d
from lightcnn.models.base import Classifier, cifar_cfg, init_he_fan_out_
from lightcnn.models.registry import register_model, register_model_pattern


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float, impl: str | None):
        super().__init__()
        self.conv1 = PreActConv2d(in_planes, planes, 3, stride, 1, impl=impl)
        self.drop_rate = drop_rate
        self.conv2 = PreActConv2d(planes, planes, 3, 1, 1, impl=impl)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            out, identity = self.conv1(x), x
        else:
            out, identity = self.conv1(x, self.shortcut)  # BN-ReLU shared by branch and projection
        out = F.dropout(out, self.drop_rate, self.training)
        return self.conv2(out) + identity


class WideResNet(Classifier):
    """WRN-depth-widen_factor for 32x32 inputs.

    Args:
        depth: total number of weighted layers d; (d - 4) must divide by 6 (n = (d - 4) / 6 blocks per group).
        widen_factor: k, the width multiplier of the three groups (16k, 32k, 64k channels).
        drop_rate: dropout probability between the two convolutions of each block (0.3 in the paper's
            dropout experiments, 0 in its main table).
        num_classes: classifier outputs (10 for CIFAR-10, 100 for CIFAR-100).
        in_chans: input image channels.
        impl: "kernel" (fused BN-ReLU-conv), "reference" (unfused PyTorch) or None (the global default).
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, drop_rate: float = 0.0, num_classes: int = 10,
                 in_chans: int = 3, impl: str | None = None):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"WideResNet: widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"WideResNet: drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, widths[3]
        self.depth, self.widen_factor, self.drop_rate = depth, widen_factor, drop_rate

        self.stem = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)  # 16 x 32 x 32
        layers, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):  # 16k x 32 x 32, 32k x 16 x 16, 64k x 8 x 8
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, stride if i == 0 else 1, drop_rate, impl))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(widths[3])  # the final pre-activation before pooling
        self.fc = nn.Linear(widths[3], num_classes)

        self.default_cfg = cifar_cfg(num_classes, in_chans)
        init_he_fan_out_(self)  # the authors' initialisation, and a zero classifier bias
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.relu(self.bn(x))  # 64k x 8 x 8

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)


@register_model_pattern(r"wrn(\d+)_(\d+)", example="wrn16_4 (WRN-16-4)")
def wide_resnet(depth: int, widen_factor: int, **kwargs) -> WideResNet:
    """WRN-depth-widen_factor from its name, e.g. `create("wrn22_8")`."""
    return WideResNet(depth=depth, widen_factor=widen_factor, **kwargs)


@register_model
def wrn28_10(**kwargs) -> WideResNet:
    """WRN-28-10, the paper's best CIFAR net (4.00% / 19.25% error; 3.89% / 18.85% with dropout 0.3); 36.5M params."""
    return WideResNet(**dict(dict(depth=28, widen_factor=10), **kwargs))


@register_model
def wrn16_8(**kwargs) -> WideResNet:
    """WRN-16-8 (paper, table 4); 11.0M params."""
    return WideResNet(**dict(dict(depth=16, widen_factor=8), **kwargs))


@register_model
def wrn40_4(**kwargs) -> WideResNet:
    """WRN-40-4 (paper, table 4); 8.9M params."""
    return WideResNet(**dict(dict(depth=40, widen_factor=4), **kwargs))
