"""Pre-activation ResNets (He, Zhang, Ren, Sun 2016, "Identity mappings in deep residual networks"), CIFAR form.

Every residual unit is a stack of BN-ReLU-conv units (the "full pre-activation" of figure 4(e)); the
identity path carries no ReLU, and one BN-ReLU follows the last unit before pooling. Where a unit changes
width or resolution, its first BN-ReLU is shared by the branch and the 1x1 projection shortcut, as in the
authors' code. Each BN-ReLU-conv is a `BNReLUConv2d` (the fused kernel; `impl="reference"` runs the
unfused PyTorch sequence). As in the authors' code (KaimingHe/resnet-1k-layers): He init over the
fan-out and a zero classifier bias.

- `preact_resnet164`, `preact_resnet1001`: bottleneck units (1x1, 3x3, 1x1 with 4x expansion), a 3x3
  stem to 16 channels and three stages of (depth - 2) / 9 units of 16, 32, 64 bottleneck widths
  (outputs 64, 128, 256; section 4 and table 3 of the paper).
- `preact_resnet18`: the 18-layer pre-activation net of basic units (two 3x3 convs) widely used on
  CIFAR, with a 3x3 stem to 64 channels and stages of 64, 128, 256, 512 channels at strides 1, 2, 2, 2.

The wide residual networks (`wide_resnet.py`) are this class with basic units, widths 16k/32k/64k,
dropout inside the units, and He init over the fan-in.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.layers import BNReLUConv2d, Impl
from lightcnn.models.base import Classifier, init_he_, make_default_cfg
from lightcnn.models.registry import register_model


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float, impl: Impl | None):
        super().__init__()
        self.conv1 = BNReLUConv2d(in_planes, planes, 3, stride, 1, impl=impl)
        self.conv2 = BNReLUConv2d(planes, planes, 3, 1, 1, drop_rate=drop_rate, impl=impl)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, identity = self.conv1(x, self.shortcut) if self.shortcut is not None else (self.conv1(x), x)
        return self.conv2(out) + identity


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, drop_rate: float, impl: Impl | None):
        super().__init__()
        out_planes = planes * self.expansion
        # The stride sits in the first 1x1 conv, as in the authors' code (KaimingHe/resnet-1k-layers).
        self.conv1 = BNReLUConv2d(in_planes, planes, 1, stride, impl=impl)
        self.conv2 = BNReLUConv2d(planes, planes, 3, 1, 1, drop_rate=drop_rate, impl=impl)
        self.conv3 = BNReLUConv2d(planes, out_planes, 1, drop_rate=drop_rate, impl=impl)
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != out_planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, identity = self.conv1(x, self.shortcut) if self.shortcut is not None else (self.conv1(x), x)
        return self.conv3(self.conv2(out)) + identity


class PreActResNet(Classifier):
    """Pre-activation ResNet for 32x32 inputs (and Wide ResNet).

    Args:
        block: "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion).
        layers: number of residual units per stage; stage i > 0 starts at stride 2.
        widths: the units' (bottleneck) width per stage; a stage outputs width * expansion channels.
        stem_width: channels of the 3x3 stem convolution.
        num_classes: classifier outputs (10 for CIFAR-10, 100 for CIFAR-100).
        in_chans: input image channels.
        drop_rate: dropout between the convolutions of each unit, as BN-ReLU-Dropout-Conv (WRN, Sec. 2.4:
            0.3 in its dropout experiments); the first BN-ReLU-conv of a unit, whose BN-ReLU output also
            feeds the projection shortcut, has none.
        he_fan_mode: the fan of the He-normal conv init: "fan_out" (the pre-act ResNet code) or "fan_in"
            (WRN's `MSRinit`).
        impl: "auto" (fused where measured faster), "kernel" (fused BN-ReLU-conv), "reference" (unfused
            PyTorch) or None (the global default, "auto").
    """

    def __init__(self, block: Literal["basic", "bottleneck"] = "bottleneck", layers: tuple[int, ...] = (18, 18, 18),
                 widths: tuple[int, ...] = (16, 32, 64), stem_width: int = 16, num_classes: int = 10,
                 in_chans: int = 3, drop_rate: float = 0.0, he_fan_mode: Literal["fan_in", "fan_out"] = "fan_out",
                 impl: Impl | None = None):
        super().__init__()
        blocks = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}
        if block not in blocks:
            raise ValueError(f"PreActResNet: block must be one of {sorted(blocks)}, got {block!r}")
        if len(layers) != len(widths) or not layers or min(layers) < 1:
            raise ValueError(f"PreActResNet: layers {layers} and widths {widths} must be equally long, each >= 1")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"PreActResNet: drop_rate must be in [0, 1), got {drop_rate}")
        Block = blocks[block]
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = widths[-1] * Block.expansion
        self.num_stages, self.drop_rate = len(layers), drop_rate

        self.stem = nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False)
        in_planes = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths)):
            units = []
            for j in range(n):
                units.append(Block(in_planes, planes, 2 if (i > 0 and j == 0) else 1, drop_rate, impl))
                in_planes = planes * Block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
        self.bn = nn.BatchNorm2d(self.num_features)  # the final activation after the last addition
        self.fc = nn.Linear(self.num_features, num_classes)

        self.default_cfg = make_default_cfg("cifar", num_classes, in_chans)
        init_he_(self, he_fan_mode)
        nn.init.zeros_(self.fc.bias)  # both authors' code

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return F.relu(self.bn(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def stage_specs(self) -> list[tuple[str, int, int]]:
        specs = [("stem", self.stem.out_channels, 1)]
        for i in range(self.num_stages):
            last = getattr(self, f"layer{i + 1}")[-1]
            specs.append((f"layer{i + 1}", (last.conv3 if hasattr(last, "conv3") else last.conv2).conv.out_channels,
                          2**i))
        return specs


# Section 4 and Table 3: 9n + 2 layers, three stages of n bottleneck units of width 16, 32, 64.
CIFAR_PREACT = dict(block="bottleneck", widths=(16, 32, 64), stem_width=16)


@register_model
def preact_resnet164(**kwargs) -> PreActResNet:
    """Pre-act ResNet-164, bottleneck, 18 units per stage (5.46% CIFAR-10 error)."""
    model_args = dict(CIFAR_PREACT, layers=(18, 18, 18))
    return PreActResNet(**dict(model_args, **kwargs))


@register_model
def preact_resnet1001(**kwargs) -> PreActResNet:
    """Pre-act ResNet-1001, bottleneck, 111 units per stage (4.62% CIFAR-10 error)."""
    model_args = dict(CIFAR_PREACT, layers=(111, 111, 111))
    return PreActResNet(**dict(model_args, **kwargs))


@register_model
def preact_resnet18(**kwargs) -> PreActResNet:
    """Pre-act ResNet-18: basic units (2, 2, 2, 2) of 64-128-256-512 channels, 3x3 stem, for CIFAR."""
    model_args = dict(block="basic", layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64)
    return PreActResNet(**dict(model_args, **kwargs))
