"""VGG (Simonyan & Zisserman 2015, "Very deep convolutional networks for large-scale image recognition").

Configurations A, B, D, E of Table 1 (`vgg11`, `vgg13`, `vgg16`, `vgg19`): stacks of 3x3/1 convolutions
with ReLU, five 2x2/2 max-pools, and three FC layers (4096, 4096, classes) with dropout 0.5 on the first
two (section 3.1). The `_bn` variants add BatchNorm after every convolution (a later addition, not in the
paper). Layers, order and parameter counts equal torchvision's, including its adaptive 7x7 average pool
before fc6 (a no-op at 224x224), so torchvision's weights load with
`lightcnn.models.weights.from_torchvision("vgg16", tv_vgg16)` (the layers map in order).

Layers carry the paper's names (conv1_1 ... conv5_3, relu4_3, pool5): `forward_features` returns pool5
(N x 512 x 7 x 7, torchvision's `features`), and `forward_layers(x, ["relu1_2", "relu2_2", ...])`
returns the named maps used for perceptual and style losses and detection backbones.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Sequence

import torch
from torch import nn

from lightcnn.models.base import Classifier, init_he_, make_default_cfg, sequential_stages
from lightcnn.models.registry import register_model
from lightcnn.models.weights import map_layers_in_order, register_twin

# Table 1: the widths of the convolutions of each of the five stages.
VGG_STAGES: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # A
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # B
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),  # D
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),  # E
}

# The maps usually taken from a VGG (Johnson et al. 2016 perceptual loss; Gatys et al. 2016 style).
PERCEPTUAL_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


class VGG(Classifier):
    """VGG: stages of 3x3 convolutions each closed by a 2x2/2 max-pool, then three FC layers.

    Args:
        num_classes: outputs of fc8 (1000 ImageNet classes in the paper).
        in_chans: input channels.
        stages: the widths of the 3x3 convolutions of each stage (VGG_STAGES[depth]).
        batch_norm: BatchNorm after every convolution (the `_bn` variants).
        pooled_size: side of the adaptive average pool before fc6 (7 at 224x224, where it does nothing).
        hidden_features: width of fc6 and fc7.
        drop_rate: dropout probability after fc6 and fc7 (section 3.1: 0.5).
        init: "kaiming" (He normal, fan-out, for the convolutions; N(0, 0.01) for the FC layers; biases 0:
            torchvision's, which trains the deep configurations from scratch, unlike the paper's N(0, 0.01)
            that needed initialising D and E from A) or "paper" (N(0, 0.01) everywhere, biases 0: section 3.1
            says "zero mean and 10^-2 variance"; std 0.01 is the common reading, as in the authors' Caffe
            models and torchvision's classifier init, and is what we use).
        input_size: the native input side, recorded in `default_cfg`.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, stages: Sequence[Sequence[int]] = VGG_STAGES[16],
                 batch_norm: bool = False, pooled_size: int = 7, hidden_features: int = 4096, drop_rate: float = 0.5,
                 init: Literal["kaiming", "paper"] = "kaiming", input_size: int = 224):
        super().__init__()
        if init not in ("kaiming", "paper"):
            raise ValueError(f"init must be 'kaiming' or 'paper', got {init!r}")
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, hidden_features
        layers: list[tuple[str, nn.Module]] = []
        c_in = in_chans
        for s, widths in enumerate(stages, start=1):
            for i, width in enumerate(widths, start=1):
                layers.append((f"conv{s}_{i}", nn.Conv2d(c_in, width, 3, padding=1)))
                if batch_norm:
                    layers.append((f"bn{s}_{i}", nn.BatchNorm2d(width)))
                layers.append((f"relu{s}_{i}", nn.ReLU(inplace=True)))
                c_in = width
            layers.append((f"pool{s}", nn.MaxPool2d(2, 2)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d(pooled_size)
        self.pre_logits = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc6", nn.Linear(c_in * pooled_size**2, hidden_features)), ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(drop_rate)),
            ("fc7", nn.Linear(hidden_features, hidden_features)), ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(drop_rate)),
        ]))
        self.fc8 = nn.Linear(hidden_features, num_classes)
        self.default_cfg = make_default_cfg("imagenet", num_classes, in_chans, input_size)
        self._init(init)

    @torch.no_grad()
    def _init(self, init: str) -> None:
        init_he_(self, "fan_out")  # convolutions (zero biases) and BatchNorms
        for m in self.modules():
            if isinstance(m, nn.Linear) or (init == "paper" and isinstance(m, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # N x 512 x 7 x 7 at 224x224 (pool5)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | Sequence[str] | None = None,
                              intermediates_only: bool = False):
        """timm's (stage indices, see `Classifier.forward_intermediates`), or, given layer names of
        `features`, those layers' outputs by name (`forward_layers`)."""
        if indices is not None and not isinstance(indices, int) and all(isinstance(i, str) for i in indices):
            return self.forward_layers(x, indices)
        return super().forward_intermediates(x, indices, intermediates_only)

    def forward_layers(self, x: torch.Tensor, layers: Sequence[str] = PERCEPTUAL_LAYERS) -> dict[str, torch.Tensor]:
        """The outputs of the named layers of `features` (e.g. "relu3_3", "conv5_3", "pool4"), in the order
        asked; the forward pass stops at the deepest one. ReLUs run in place, so ask for "reluX_Y" rather
        than "convX_Y" when both are wanted."""
        names = dict(self.features.named_children())
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"forward_layers: unknown layer(s) {unknown}; this VGG has {list(names)}")
        wanted, out = set(layers), {}
        remaining = len(wanted)
        for name, module in names.items():
            x = module(x)
            if name in wanted:
                # the ReLU after a convolution or BatchNorm runs in place: keep a copy of their output
                out[name] = x.clone() if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) else x
                remaining -= 1
                if remaining == 0:
                    break
        return {n: out[n] for n in layers}

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.avgpool(x))
        return x if pre_logits else self.fc8(x)

    classifier_name = "fc8"

    def stage_specs(self) -> list[tuple[str, int, int]]:
        return sequential_stages(self.features, "features", self.in_chans)


@register_model
def vgg11(**kwargs) -> VGG:
    """VGG configuration A (11 weight layers)."""
    model_args = dict(stages=VGG_STAGES[11], batch_norm=False)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg13(**kwargs) -> VGG:
    """VGG configuration B (13 weight layers)."""
    model_args = dict(stages=VGG_STAGES[13], batch_norm=False)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg16(**kwargs) -> VGG:
    """VGG configuration D (16 weight layers)."""
    model_args = dict(stages=VGG_STAGES[16], batch_norm=False)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg19(**kwargs) -> VGG:
    """VGG configuration E (19 weight layers)."""
    model_args = dict(stages=VGG_STAGES[19], batch_norm=False)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 with BatchNorm after every convolution."""
    model_args = dict(stages=VGG_STAGES[11], batch_norm=True)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 with BatchNorm after every convolution."""
    model_args = dict(stages=VGG_STAGES[13], batch_norm=True)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with BatchNorm after every convolution."""
    model_args = dict(stages=VGG_STAGES[16], batch_norm=True)
    return VGG(**dict(model_args, **kwargs))


@register_model
def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with BatchNorm after every convolution."""
    model_args = dict(stages=VGG_STAGES[19], batch_norm=True)
    return VGG(**dict(model_args, **kwargs))


for _name in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
    register_twin("torchvision", _name, map_layers_in_order, classifier="fc8")
