"""ResNet (He, Zhang, Ren, Sun 2015, "Deep Residual Learning for Image Recognition").

One family class, `ResNet`, builds every residual network of this package that has post-activation
blocks (conv-BN-ReLU-conv-BN, add, ReLU):

* ImageNet `resnet18/34/50/101/152` (Table 1). By default the paper's v1 layout: a bottleneck's
  stride sits in its first 1x1 conv. `stride_in_1x1=False` gives torchvision's "v1.5" (stride in
  the 3x3, from fb.resnet.torch), which costs more MACs and is what torchvision's weights use.
* CIFAR `resnet20/32/44/56/110/1202` (Section 4.2): a 3x3 stem, 6n+2 layers in three stages of
  16/32/64 channels, and option A shortcuts (parameter-free: subsample, append zero channels).
* ResNeXt (`resnext.py`) is this class with grouped bottlenecks (`cardinality`, `base_width`):
  builders only, as timm's `resnext50_32x4d` and torchvision's `wide_resnet50_2`.
* Stochastic depth (`sd_resnet.py`, Huang et al. 2016) is this class with `p_L < 1`: each block
  has a survival probability and, while training, one Bernoulli gate per block per mini-batch.

Shortcuts of the ImageNet nets: the paper's Table 2 trains ResNet-18/34 with option A (zero-padding
identity, no parameters) and ResNet-50/101/152 with option B (projection where shapes change). Every
builder here defaults to B, torchvision's choice, whose weights import and whose parameter counts
`lightcnn/published.py` lists; `create("resnet34", shortcut="A")` is the paper's Table 2 network.

State-dict keys follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, `fc`),
so torchvision's weights load unrenamed where the architectures are equal (`lightcnn.models.weights.
from_torchvision`; the layout check is `convert_torchvision_state_dict` at the end of this file).
"""
from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.models.base import Classifier, init_he_, make_default_cfg
from lightcnn.models.registry import register_model
from lightcnn.models.weights import register_twin


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=bias)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=bias)


class ZeroPadShortcut(nn.Module):
    """Option A shortcut (Section 3.3): identity with extra zero channels, no parameters.

    `pool="subsample"` takes every `stride`-th pixel (the ResNet paper, fb.resnet.torch's type A);
    `pool="avg"` averages `stride x stride` windows (stochastic depth's official CIFAR code).
    The new channels are appended after the old ones.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 pool: Literal["subsample", "avg"] = "subsample"):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"an option A (zero-padding) shortcut cannot shrink {in_channels} channels to "
                             f"{out_channels}; use shortcut='B' (projection) for this layout")
        if pool not in ("subsample", "avg"):
            raise ValueError(f"pool must be 'subsample' or 'avg', got {pool!r}")
        self.in_channels, self.out_channels, self.stride, self.pool = in_channels, out_channels, stride, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            s = self.stride
            x = x[:, :, ::s, ::s] if self.pool == "subsample" else F.avg_pool2d(x, s, s)
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}, pool={self.pool!r}"


class _Residual(nn.Module):
    """What every block shares: the shortcut, the final ReLU and the stochastic-depth gate.

    Stochastic depth (Huang et al. 2016, Section 3): while training, the residual branch survives a
    mini-batch with probability `survival_prob` (one draw per block per forward call, from the CPU
    generator in eager mode, so no device sync); a dropped block is `relu(shortcut(x))` and its branch
    is not run, so it neither costs time nor updates its BN statistics. In eval the branch is always
    run and scaled by `survival_prob` (Section 3, "Stochastic depth during testing"). With
    `survival_prob == 1` the block is a plain residual block. Subclasses define `residual(x)`.
    """

    survival_prob: float = 1.0
    downsample: nn.Module | None
    relu: nn.Module

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def zero_init_last(self) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        p = self.survival_prob
        if self.training and p < 1.0:
            if torch.compiler.is_compiling():
                # A Python `if` on a random draw would break the graph at every block: compiled code
                # runs the branch and multiplies it by the 0/1 gate (same outputs and gradients; only a
                # dropped branch's BN running statistics still update).
                keep = torch.rand((), device=x.device) < p
                return self.relu(self.residual(x) * keep + identity)
            if bool(torch.rand(()) >= p):
                return F.relu(identity)  # not in place: identity may be the input, saved by autograd
            return self.relu(self.residual(x) + identity)
        out = self.residual(x)
        if p < 1.0:
            out = out * p
        return self.relu(out + identity)

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4g}" if self.survival_prob < 1.0 else ""


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 cardinality: int = 1, base_width: int = 64, stride_in_1x1: bool = True, bias: bool = False,
                 survival_prob: float = 1.0):
        super().__init__()
        if cardinality != 1 or base_width != 64:
            raise ValueError("the basic block has no grouped conv: cardinality/base_width need block='bottleneck'")
        self.conv1 = conv3x3(inplanes, planes, stride, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self.survival_prob = survival_prob

    def zero_init_last(self) -> None:
        """Goyal et al. 2017, Sec. 5.1: the last BN's gamma at 0, so the block starts as its shortcut."""
        nn.init.zeros_(self.bn2.weight)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand by 4.

    Width of the 3x3: `planes * base_width / 64 * cardinality` (ResNeXt Table 1's template C x d,
    d = base_width * planes / 64). `stride_in_1x1=True` is the ResNet paper (v1); False puts the
    stride in the 3x3 (v1.5, also the ResNeXt authors' code).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 cardinality: int = 1, base_width: int = 64, stride_in_1x1: bool = True, bias: bool = False,
                 survival_prob: float = 1.0):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * cardinality
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, s1, bias=bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups=cardinality, bias=bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion, bias=bias)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.survival_prob = survival_prob

    def zero_init_last(self) -> None:
        """Goyal et al. 2017, Sec. 5.1: the last BN's gamma at 0, so the block starts as its shortcut."""
        nn.init.zeros_(self.bn3.weight)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def survival_probabilities(num_blocks: int, p_L: float,
                           rule: Literal["linear", "uniform"] = "linear") -> list[float]:
    """Stochastic depth's survival probabilities of blocks l = 1..L (Huang et al. 2016, Eq. 4).

    "linear": p_l = 1 - l / L * (1 - p_L), so the first block almost always survives and the last one
    survives with p_L; "uniform": every block survives with p_L.
    """
    if not 0.0 < p_L <= 1.0:
        raise ValueError(f"p_L (survival probability of the last block) must be in (0, 1], got {p_L}")
    if rule == "linear":
        return [1.0 - l / num_blocks * (1.0 - p_L) for l in range(1, num_blocks + 1)]
    if rule == "uniform":
        return [float(p_L)] * num_blocks
    raise ValueError(f"survival_rule must be 'linear' or 'uniform', got {rule!r}")


class ResNet(Classifier):
    """Post-activation residual network (ResNet, ResNeXt, stochastic-depth ResNet).

    Args:
        block: "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, expansion 4).
        layers: number of blocks per stage; stage i > 0 starts with a stride-2 block.
        num_classes: classifier outputs (1000 for ImageNet, 10 for CIFAR-10).
        in_chans: input image channels.
        widths: `planes` of each stage (the bottleneck's output is 4x that); one per entry of `layers`.
        stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (3x3 conv, BN, ReLU).
        stem_width: output channels of the stem conv.
        shortcut: the paper's Section 3.3 options: "A" zero-padding identity where shapes change
            (no parameters), "B" 1x1 projection + BN where shapes change, "C" projection everywhere.
        shortcut_pool: how an option A shortcut downsamples: "subsample" (the ResNet paper) or "avg"
            (a stride x stride average pool, as in stochastic depth's CIFAR code).
        stride_in_1x1: bottleneck only. True: the paper's v1, stride in the first 1x1 conv. False:
            torchvision's v1.5 / ResNeXt, stride in the 3x3 conv.
        cardinality: groups of the bottleneck's 3x3 conv (ResNeXt's C; 1 for ResNet).
        base_width: ResNeXt's bottleneck width d for the first stage (64 for ResNet).
        conv_bias: give every conv a bias (stochastic depth's Torch code did; redundant before BN).
        p_L: stochastic depth's survival probability of the last block; 1.0 turns it off.
        survival_rule: "linear" decay from 1 to p_L over the blocks (the paper's default) or "uniform".
        zero_init_residual: start each block's last BN at gamma = 0 (the blocks' `zero_init_last`), so
            every block starts as identity (Goyal et al. 2017); off in the paper.
        he_fan_mode: the fan of the He-normal conv init: "fan_out" (fb.resnet.torch, the ResNeXt code) or
            "fan_in" (stochastic depth's CIFAR code, `nninit.kaiming`).

    While training with `p_L < 1` a dropped block's parameters get no gradient: DDP then needs
    `find_unused_parameters=True`, and all ranks must share the CPU seed so they drop the same blocks.
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"] = "bottleneck",
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: Literal["imagenet", "cifar"] = "imagenet",
        stem_width: int = 64,
        shortcut: Literal["A", "B", "C"] = "B",
        shortcut_pool: Literal["subsample", "avg"] = "subsample",
        stride_in_1x1: bool = True,
        cardinality: int = 1,
        base_width: int = 64,
        conv_bias: bool = False,
        p_L: float = 1.0,
        survival_rule: Literal["linear", "uniform"] = "linear",
        zero_init_residual: bool = False,
        he_fan_mode: Literal["fan_in", "fan_out"] = "fan_out",
    ):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        layers, widths = list(layers), list(widths)
        if not layers or len(layers) != len(widths) or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f"layers {layers} and widths {widths} need one positive entry per stage each")
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"shortcut must be 'A' (zero-pad), 'B' or 'C' (projection), got {shortcut!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        if cardinality < 1 or base_width < 1:
            raise ValueError(f"cardinality and base_width must be >= 1, got {cardinality}, {base_width}")
        if num_classes < 1 or in_chans < 1:
            raise ValueError(f"num_classes and in_chans must be >= 1, got {num_classes}, {in_chans}")
        block_cls = _BLOCKS[block]
        probs = survival_probabilities(sum(layers), p_L, survival_rule)

        self.num_classes, self.in_chans = num_classes, in_chans
        self.block, self.layers, self.stem, self.shortcut = block, layers, stem, shortcut
        self.stride_in_1x1, self.cardinality, self.base_width = stride_in_1x1, cardinality, base_width
        self.conv_bias, self.p_L, self.survival_rule = conv_bias, p_L, survival_rule

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=conv_bias)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_chans, stem_width, bias=conv_bias)
            self.bn1 = nn.BatchNorm2d(stem_width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.Identity()

        inplanes, l = stem_width, 0
        for i, (n, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                out = planes * block_cls.expansion
                downsample = None
                if shortcut == "C" or stride != 1 or inplanes != out:
                    if shortcut == "A":
                        downsample = ZeroPadShortcut(inplanes, out, stride, shortcut_pool)
                    else:
                        downsample = nn.Sequential(conv1x1(inplanes, out, stride, bias=conv_bias),
                                                   nn.BatchNorm2d(out))
                blocks.append(block_cls(inplanes, planes, stride, downsample, cardinality, base_width,
                                        stride_in_1x1, conv_bias, probs[l]))
                inplanes, l = out, l + 1
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.default_cfg = make_default_cfg("imagenet" if stem == "imagenet" else "cifar", num_classes, in_chans)

        init_he_(self, he_fan_mode)
        if zero_init_residual:
            for blk in self.residual_blocks():
                blk.zero_init_last()

    def set_stochastic_depth(self, p_L: float, survival_rule: Literal["linear", "uniform"] = "linear") -> None:
        """Set every block's survival probability (e.g. p_L=1.0 to switch stochastic depth off)."""
        blocks = self.residual_blocks()
        for blk, p in zip(blocks, survival_probabilities(len(blocks), p_L, survival_rule)):
            blk.survival_prob = p
        self.p_L, self.survival_rule = p_L, survival_rule

    def residual_blocks(self) -> list[_Residual]:
        """The residual blocks in order l = 1..L (what stochastic depth numbers)."""
        return [b for i in range(self.num_stages) for b in getattr(self, f"layer{i + 1}")]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # ImageNet: N x 64 x 56 x 56; CIFAR: N x 16 x 32 x 32
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x  # ImageNet: N x 2048 (basic: 512) x 7 x 7; CIFAR: N x 64 x 8 x 8

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def stage_specs(self) -> list[tuple[str, int, int]]:
        first = 4 if self.stem == "imagenet" else 1  # after the 7x7/2 conv and the 3x3/2 max-pool
        specs = [("relu", self.conv1.out_channels, 2 if self.stem == "imagenet" else 1)]
        for i in range(self.num_stages):
            last = getattr(self, f"layer{i + 1}")[-1]
            bn = last.bn3 if isinstance(last, Bottleneck) else last.bn2
            specs.append((f"layer{i + 1}", bn.num_features, first * 2**i))
        return specs


# The CIFAR nets of Section 4.2: 6n+2 layers, n basic blocks per stage on 32/16/8 maps of 16/32/64 channels.
CIFAR_RESNET = dict(block="basic", widths=(16, 32, 64), stem="cifar", stem_width=16, shortcut="A", num_classes=10)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (ImageNet, basic blocks 2-2-2-2, option B; shortcut="A" for the paper's Table 2)."""
    model_args = dict(block="basic", layers=(2, 2, 2, 2))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (ImageNet, basic blocks 3-4-6-3, option B; shortcut="A" for the paper's Table 2)."""
    model_args = dict(block="basic", layers=(3, 4, 6, 3))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (ImageNet, bottlenecks 3-4-6-3): the paper's v1; stride_in_1x1=False for v1.5."""
    model_args = dict(block="bottleneck", layers=(3, 4, 6, 3))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (ImageNet, bottlenecks 3-4-23-3): the paper's v1; stride_in_1x1=False for v1.5."""
    model_args = dict(block="bottleneck", layers=(3, 4, 23, 3))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (ImageNet, bottlenecks 3-8-36-3): the paper's v1; stride_in_1x1=False for v1.5."""
    model_args = dict(block="bottleneck", layers=(3, 8, 36, 3))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet20(**kwargs) -> ResNet:
    """ResNet-20 (CIFAR, n=3, option A)."""
    model_args = dict(CIFAR_RESNET, layers=(3, 3, 3))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet32(**kwargs) -> ResNet:
    """ResNet-32 (CIFAR, n=5, option A)."""
    model_args = dict(CIFAR_RESNET, layers=(5, 5, 5))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet44(**kwargs) -> ResNet:
    """ResNet-44 (CIFAR, n=7, option A)."""
    model_args = dict(CIFAR_RESNET, layers=(7, 7, 7))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet56(**kwargs) -> ResNet:
    """ResNet-56 (CIFAR, n=9, option A)."""
    model_args = dict(CIFAR_RESNET, layers=(9, 9, 9))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet110(**kwargs) -> ResNet:
    """ResNet-110 (CIFAR, n=18, option A); paper error 6.43%."""
    model_args = dict(CIFAR_RESNET, layers=(18, 18, 18))
    return ResNet(**dict(model_args, **kwargs))


@register_model
def resnet1202(**kwargs) -> ResNet:
    """ResNet-1202 (CIFAR, n=200, option A)."""
    model_args = dict(CIFAR_RESNET, layers=(200, 200, 200))
    return ResNet(**dict(model_args, **kwargs))


# --- torchvision's weights --------------------------------------------------------------------------------
def convert_torchvision_state_dict(model: ResNet, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Our keys are torchvision's, so nothing is renamed; what needs checking is the layout, because a v1
    bottleneck has the same tensor shapes as torchvision's v1.5 and would load silently but compute
    something else."""
    problems = []
    if model.stem != "imagenet":
        problems.append("stem must be 'imagenet' (7x7/2 conv + max-pool)")
    if model.shortcut != "B":
        problems.append("shortcut must be 'B' (projection where shapes change)")
    if model.conv_bias:
        problems.append("conv_bias must be False")
    if model.block == "bottleneck" and model.stride_in_1x1:
        problems.append("stride_in_1x1 must be False: torchvision's bottleneck is v1.5 (stride in the 3x3)")
    if any(b.survival_prob < 1.0 for b in model.residual_blocks()):
        problems.append("every block's survival probability must be 1: stochastic depth scales the branches "
                        "in eval, torchvision's network does not; build the model with p_L=1.0")
    if problems:
        raise ValueError("this model's architecture differs from torchvision's: " + "; ".join(problems))
    return state_dict


# stride_in_1x1=False: torchvision's bottleneck is v1.5 (the basic block ignores the knob).
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_twin("torchvision", _name, convert_torchvision_state_dict, stride_in_1x1=False)
