"""DenseNets (Huang, Liu, van der Maaten, Weinberger 2017, "Densely connected convolutional networks").

Layer l of a dense block reads the concatenation of the block's input and of every earlier layer's k new
channels (k: the growth rate) and adds k channels of its own. A layer is BN-ReLU-Conv3x3, or with the
bottleneck of DenseNet-B BN-ReLU-Conv1x1 (to 4k channels) then BN-ReLU-Conv3x3 (Sec. 3); a transition
between blocks is BN-ReLU-Conv1x1 (to floor(theta * C) channels, theta = 0.5 in DenseNet-C/BC) then 2x2
average pooling. After the last block: BN, ReLU, global average pooling, the classifier.

Memory: every BN-ReLU-Conv over a concatenation is a `lightcnn.layers.DenseConv2d`, which takes the block's
list of feature maps and, on the DenseNet kernel, never stores their concatenation nor its BN-ReLU output
(recomputed in the backward from the saved batch statistics), and every 3x3 of a bottleneck layer is the
fused `BNReLUConv2d`, which keeps only its input; so a block's activation memory grows linearly with its
depth instead of quadratically. `impl="reference"` runs the naive sequence (`torch.cat`, BatchNorm2d, ReLU,
Conv2d per layer) everywhere, `concat_impl="reference"` only in the layers over a concatenation; the
state_dict, the outputs, the gradients and the running statistics are the same either way.

- ImageNet (Table 1; torchvision's layout): `densenet121/169/201/264` (k=32, 64 stem channels) and
  `densenet161` (k=48, 96 stem channels): a 7x7/2 conv, BN, ReLU, 3x3/2 max pooling, four DenseNet-BC
  blocks.
- CIFAR (Sec. 3, "Implementation Details", and Sec. 4.2): a 3x3 conv to 16 channels (2k for DenseNet-BC), as
  the paper says (the authors' Lua, `models/densenet.lua`, uses 2k for every variant: 24 for L=40, k=12,
  which `num_init_features=24` reproduces), three blocks at 32, 16 and 8 pixels. `densenet40_k12`,
  `densenet100_k12`: (L - 4) / 3 plain 3x3 layers per block, no compression; `densenet_bc100_k12`,
  `densenet_bc250_k24`, `densenet_bc190_k40`: (L - 4) / 6 bottleneck layers per block, theta = 0.5.

Torchvision twins (`lightcnn.models.weights.from_torchvision`): densenet121, densenet161, densenet169,
densenet201.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.layers import BNReLUConv2d, DenseConv2d, Impl
from lightcnn.models.base import Classifier, init_he_, make_default_cfg
from lightcnn.models.registry import register_model
from lightcnn.models.weights import register_twin


class DenseLayer(nn.Module):
    """One dense layer: k new channels from the list of the block's feature maps so far.

    Dropout (`drop_rate` > 0) follows every convolution, as Sec. 4.2 says and the authors' Lua
    (`DenseConnectLayer.lua`) does: after the bottleneck 1x1 (`drop_bottleneck`) and after the layer's
    3x3 (`drop`). The bottleneck's dropout acts on the op's output, which nothing else keeps: autograd saves
    only its mask, and the fused 3x3 keeps the dropped 4k channels as its input, so a layer still keeps
    O(k) channels and a block's activation memory stays linear in its depth."""

    def __init__(self, in_channels: int, growth_rate: int, bn_size: int | None, drop_rate: float,
                 impl: Impl | None, concat_impl: Impl | None):
        super().__init__()
        if bn_size:  # DenseNet-B: 1x1 to bn_size * k, then the 3x3 (the fused pre-activation unit)
            self.bottleneck = DenseConv2d(in_channels, bn_size * growth_rate, 1, impl=concat_impl)
            self.drop_bottleneck = nn.Dropout(drop_rate) if drop_rate else None
            self.conv = BNReLUConv2d(bn_size * growth_rate, growth_rate, 3, padding=1, impl=impl)
        else:
            self.bottleneck = self.drop_bottleneck = None
            self.conv = DenseConv2d(in_channels, growth_rate, 3, padding=1, impl=concat_impl)
        self.drop = nn.Dropout(drop_rate) if drop_rate else None

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.bottleneck is not None:
            x = self.bottleneck(features)
            out = self.conv(self.drop_bottleneck(x) if self.drop_bottleneck is not None else x)
        else:
            out = self.conv(features)
        return self.drop(out) if self.drop is not None else out


class DenseBlock(nn.Module):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int | None, drop_rate: float,
                 impl: Impl | None, concat_impl: Impl | None):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, drop_rate, impl, concat_impl)
            for i in range(num_layers))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The list of feature maps grows by one per layer; it is never concatenated here."""
        features = list(features)
        for layer in self.layers:
            features.append(layer(features))
        return features


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 over the block's feature maps, dropout (`drop_rate` > 0, as after every convolution
    but the stem: Sec. 4.2 and the authors' `models/densenet.lua`), then 2x2 average pooling (Sec. 3)."""

    def __init__(self, in_channels: int, out_channels: int, impl: Impl | None, drop_rate: float = 0.0):
        super().__init__()
        self.conv = DenseConv2d(in_channels, out_channels, 1, impl=impl)
        self.drop = nn.Dropout(drop_rate) if drop_rate else None

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv(features)
        return F.avg_pool2d(self.drop(x) if self.drop is not None else x, 2)


class DenseNet(Classifier):
    """DenseNet for ImageNet (stem="imagenet") or CIFAR (stem="cifar").

    Args:
        growth_rate: k, the channels each layer adds.
        block_config: the number of layers of each dense block.
        num_init_features: channels of the stem convolution (64 / 96 on ImageNet; 16, or 2k for DenseNet-BC,
            on CIFAR).
        bn_size: the bottleneck width in units of k (4 in DenseNet-B/BC), or None for plain 3x3 layers.
        compression: theta, a transition keeps floor(theta * C) channels (0.5 in DenseNet-C/BC, 1 otherwise).
        drop_rate: dropout after every convolution but the stem's: a layer's bottleneck 1x1 and its 3x3, and
            each transition's 1x1 (Sec. 4.2: 0.2 in the runs without data augmentation).
        stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max pooling) or "cifar" (one 3x3 conv).
        num_classes: classifier outputs.
        in_chans: input image channels.
        impl: "auto" (lightcnn's ops where measured faster), "kernel", "reference" (the unfused PyTorch sequence),
            or None (the global default, "auto").
        concat_impl: the impl of the layers over a concatenation (bottleneck 1x1s, plain 3x3s, transitions)
            alone; None: `impl`. "reference" is the naive per-layer `torch.cat` + BN + ReLU + conv
            (torchvision's `memory_efficient=False`) while the fused 3x3s follow `impl`.
    """

    # create(): an old argument's name -> what to write instead
    renamed_args = {"memory_efficient": "concat_impl: memory_efficient=False is concat_impl='reference' (the "
                                        "default stores no concatenation)"}

    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int | None = 4, compression: float = 0.5,
                 drop_rate: float = 0.0, stem: str = "imagenet", num_classes: int = 1000, in_chans: int = 3,
                 impl: Impl | None = None, concat_impl: Impl | None = None):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"DenseNet: stem must be 'imagenet' or 'cifar', got {stem!r}")
        if not block_config or min(block_config) < 1 or growth_rate < 1:
            raise ValueError(f"DenseNet: block_config {block_config} needs >= 1 layer per block, growth_rate >= 1")
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"DenseNet: compression must be in (0, 1], got {compression}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"DenseNet: drop_rate must be in [0, 1), got {drop_rate}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.growth_rate, self.block_config = growth_rate, tuple(block_config)
        concat_impl = impl if concat_impl is None else concat_impl

        if stem == "imagenet":
            self.stem = nn.Sequential(OrderedDict(
                conv0=nn.Conv2d(in_chans, num_init_features, 7, 2, 3, bias=False),
                norm0=nn.BatchNorm2d(num_init_features),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(3, 2, 1),
            ))
        else:
            self.stem = nn.Sequential(OrderedDict(conv0=nn.Conv2d(in_chans, num_init_features, 3, 1, 1, bias=False)))
        blocks, transitions, c = [], [], num_init_features
        for i, n in enumerate(block_config):
            blocks.append(DenseBlock(n, c, growth_rate, bn_size, drop_rate, impl, concat_impl))
            c += n * growth_rate
            if i < len(block_config) - 1:
                out = int(c * compression)
                transitions.append(Transition(c, out, concat_impl, drop_rate))
                c = out
        self.blocks, self.transitions = nn.ModuleList(blocks), nn.ModuleList(transitions)
        self.norm = nn.BatchNorm2d(c)  # the last BN before pooling
        self.num_features = c
        self.fc = nn.Linear(c, num_classes)

        dataset = "imagenet" if stem == "imagenet" else ("cifar100" if num_classes == 100 else "cifar10")
        self.default_cfg = make_default_cfg(dataset, num_classes, in_chans)
        init_he_(self, "fan_out")  # the authors' code (built on fb.resnet.torch): std sqrt(2 / (k * k * out))
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for i, block in enumerate(self.blocks):
            features = block(features)
            if i < len(self.transitions):
                features = [self.transitions[i](features)]
        # One concatenation per network (the classifier's input), not one per layer.
        return F.relu(self.norm(torch.cat(features, 1)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.fc(x)

    def stage_specs(self) -> list[tuple[str, int, int]]:
        """The stem, each dense block but the last (its concatenated maps), and the last BN (before ReLU)."""
        first = 4 if isinstance(self.stem[-1], nn.MaxPool2d) else 1
        specs = [("stem", self.stem.conv0.out_channels, first)]
        for i, block in enumerate(self.blocks[:-1]):
            layer = block.layers[0]
            c_in = (layer.bottleneck if layer.bottleneck is not None else layer.conv).bn.num_features
            specs.append((f"blocks.{i}", c_in + len(block.layers) * self.growth_rate, first * 2**i))
        return specs + [("norm", self.num_features, first * 2 ** (len(self.blocks) - 1))]


# --- torchvision's weights ------------------------------------------------------------------------------

_TV_RULES = [
    (r"features\.conv0\.", "stem.conv0."),
    (r"features\.norm0\.", "stem.norm0."),
    (r"features\.denseblock(\d+)\.denselayer(\d+)\.norm1\.", "blocks.{0}.layers.{1}.bottleneck.bn."),
    (r"features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.", "blocks.{0}.layers.{1}.bottleneck.conv."),
    (r"features\.denseblock(\d+)\.denselayer(\d+)\.norm2\.", "blocks.{0}.layers.{1}.conv.bn."),
    (r"features\.denseblock(\d+)\.denselayer(\d+)\.conv2\.", "blocks.{0}.layers.{1}.conv.conv."),
    (r"features\.transition(\d+)\.norm\.", "transitions.{0}.conv.bn."),
    (r"features\.transition(\d+)\.conv\.", "transitions.{0}.conv.conv."),
    (r"features\.norm5\.", "norm."),
    (r"classifier\.", "fc."),
]


def convert_torchvision_state_dict(model: DenseNet,
                                   tv_state_dict: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A torchvision DenseNet state_dict (densenet121/161/169/201, or any torchvision.models.DenseNet) renamed
    to our keys (torchvision's blocks and layers count from 1, ours from 0); shapes are checked on loading."""
    if not isinstance(model, DenseNet):
        raise TypeError(f"convert_torchvision_state_dict: expected a lightcnn DenseNet, got {type(model).__name__}")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in tv_state_dict.items():
        for pattern, target in _TV_RULES:
            m = re.match(pattern, key)
            if m:
                out[target.format(*(int(g) - 1 for g in m.groups())) + key[m.end():]] = value
                break
        else:
            raise ValueError(f"convert_torchvision_state_dict: {key!r} is not a torchvision DenseNet key; "
                             "give the state_dict of a torchvision.models.densenet* model")
    return out


# --- ImageNet (Table 1) -------------------------------------------------------------------------------------


@register_model
def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121 (k=32; blocks 6, 12, 24, 16): 25.02/7.71% ImageNet error (the paper's single-crop Table 3;
    torchvision's weights: 25.57/8.03); 7,978,856 params, 2.83 GMACs."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169 (k=32; blocks 6, 12, 32, 32): 14,149,480 params, 3.36 GMACs."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201 (k=32; blocks 6, 12, 48, 32): 20,013,928 params, 4.29 GMACs."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet264(**kwargs) -> DenseNet:
    """DenseNet-264 (k=32; blocks 6, 12, 64, 48): 33,337,704 params, 5.75 GMACs."""
    model_args = dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (k=48, 96 stem channels; blocks 6, 12, 36, 24): torchvision's, 28,681,000 params."""
    model_args = dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96)
    return DenseNet(**dict(model_args, **kwargs))


# --- CIFAR (Sec. 4.2, Table 2) -----------------------------------------------------------------------------


def _cifar_args(depth: int, growth_rate: int, bc: bool) -> dict:
    """The CIFAR DenseNet (BC: bottlenecks and compression 0.5) of depth L and growth rate k (Sec. 4.2)."""
    per_block = 6 if bc else 3  # a bottleneck layer has two convolutions
    if (depth - 4) % per_block:
        raise ValueError(f"DenseNet{'-BC' if bc else ''} on CIFAR: depth must be {per_block}n + 4, got {depth}")
    n = (depth - 4) // per_block
    return dict(growth_rate=growth_rate, block_config=(n, n, n), num_init_features=2 * growth_rate if bc else 16,
                bn_size=4 if bc else None, compression=0.5 if bc else 1.0, stem="cifar", num_classes=10)


@register_model
def densenet40_k12(**kwargs) -> DenseNet:
    """DenseNet (L=40, k=12), 12 plain layers per block: 7.00% C10 (no augmentation) / 5.24% C10+; 1.0M params."""
    model_args = _cifar_args(40, 12, False)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet100_k12(**kwargs) -> DenseNet:
    """DenseNet (L=100, k=12), 32 plain layers per block: 4.10% C10+; 7.0M params."""
    model_args = _cifar_args(100, 12, False)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet_bc100_k12(**kwargs) -> DenseNet:
    """DenseNet-BC (L=100, k=12), 16 bottleneck layers per block: 4.51% C10+ (22.27% C100+); 0.8M params."""
    model_args = _cifar_args(100, 12, True)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet_bc250_k24(**kwargs) -> DenseNet:
    """DenseNet-BC (L=250, k=24), 41 bottleneck layers per block: 3.62% C10+; 15.3M params."""
    model_args = _cifar_args(250, 24, True)
    return DenseNet(**dict(model_args, **kwargs))


@register_model
def densenet_bc190_k40(**kwargs) -> DenseNet:
    """DenseNet-BC (L=190, k=40), 31 bottleneck layers per block: 3.46% C10+ (17.18% C100+); 25.6M params."""
    model_args = _cifar_args(190, 40, True)
    return DenseNet(**dict(model_args, **kwargs))


for _name in ("densenet121", "densenet161", "densenet169", "densenet201"):
    register_twin("torchvision", _name, convert_torchvision_state_dict)
