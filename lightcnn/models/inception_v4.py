"""Inception-v4 (Szegedy, Ioffe, Vanhoucke, Alemi 2016, "Inception-v4, Inception-ResNet and the impact of
residual connections on learning"), Fig. 9: the stem of Fig. 3, 4 x Inception-A (Fig. 4), Reduction-A
(Fig. 7, k=192, l=224, m=256, n=384 in Table 1), 7 x Inception-B (Fig. 5), Reduction-B (Fig. 8),
3 x Inception-C (Fig. 6), average pooling, dropout (keep 0.8) and the classifier; 299x299 input.

Built as released in TF-slim (`nets/inception_v4.py`), whose layout timm's `inception_v4` copies, so
its weights import (`lightcnn.models.weights.from_timm`): every convolution is conv (no bias) ->
BatchNorm (eps 0.001, as TF-slim's arg scope) -> ReLU, the stem's 7x1/1x7 pair is ordered 1x7 first,
the pooling branches average over the valid (unpadded) inputs, and the modules and layers carry
TF-slim's names (Mixed_5b, Branch_1, Conv2d_0b_1x7, ...). 42,679,816 parameters, 12.25 GMACs. Weights start
as TF-slim's inception arg scope draws them (`init_tf_slim_`: He fan-in truncated normal convolutions, Glorot
uniform logits, zero biases). TF-slim
also builds an auxiliary head on Mixed_6h, which the paper does not describe; like timm we leave it out
unless `aux_logits=True` (the recipe builds it, as TF-slim trained the released checkpoint).

The building blocks (`ConvBNReLU`, `branch`, `Mixed`, `block_reduction_a`, named as TF-slim's functions) are shared with
`lightcnn.models.inception_resnet`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal, NamedTuple, Sequence

import torch
from torch import nn

from lightcnn.models.base import Classifier, make_default_cfg, sequential_stages
from lightcnn.models.registry import register_model
from lightcnn.models.weights import map_layers_in_order, register_twin

BN_EPS = 1e-3  # TF-slim's inception arg scope (batch_norm_epsilon=0.001)


class ConvBNReLU(nn.Sequential):
    """conv (no bias) -> BN -> ReLU, TF-slim's `slim.conv2d` with batch norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride: int = 1,
                 padding: tuple[int, int] = (0, 0), bn_eps: float = BN_EPS):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
            bn=nn.BatchNorm2d(out_channels, eps=bn_eps),
            relu=nn.ReLU(inplace=True),
        ))
        self.out_channels = out_channels


def _kernel(name: str) -> tuple[int, int]:
    """The kernel TF-slim writes at the end of a layer's name: Conv2d_0b_1x7 -> (1, 7) (height x width)."""
    h, _, w = name.rpartition("_")[2].partition("x")
    return int(h), int(w)


def _same(name: str) -> tuple[int, int]:
    """The padding of a stride-1 "same" layer with an odd kernel."""
    kh, kw = _kernel(name)
    return kh // 2, kw // 2


def branch(in_channels: int, *layers: tuple, bn_eps: float = BN_EPS) -> tuple[nn.Sequential, int]:
    """A TF-slim branch and its output width. Each layer is `(name, out_channels, stride=1, "same"|"valid")`
    with the kernel read from the name; "MaxPool_*" and "AvgPool_*" layers keep the width (out_channels
    None); average pools are 3x3/1 "same" and, as TF's, average over the valid inputs only."""
    modules, c = OrderedDict(), in_channels
    for name, out, *rest in layers:
        stride, padding = (list(rest) + [1, "same"][len(rest):])[:2]
        kh, kw = _kernel(name)
        pad = _same(name) if padding == "same" else (0, 0)
        if name.startswith("MaxPool"):
            modules[name] = nn.MaxPool2d((kh, kw), stride, pad)
        elif name.startswith("AvgPool"):
            modules[name] = nn.AvgPool2d((kh, kw), stride, pad, count_include_pad=False)
        else:
            modules[name] = ConvBNReLU(c, out, (kh, kw), stride, pad, bn_eps)
            c = out
    return nn.Sequential(modules), c


class Fork(nn.Module):
    """The end of an Inception-C branch (Fig. 6): a trunk, then two convolutions side by side on its output
    (1x3 and 3x1), concatenated. Layers are registered flat, under TF-slim's names, in TF-slim's order."""

    def __init__(self, trunk: nn.Sequential, heads: nn.Sequential):
        super().__init__()
        self.trunk_names, self.head_names = list(trunk._modules), list(heads._modules)
        for name, m in [*trunk.named_children(), *heads.named_children()]:
            self.add_module(name, m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.trunk_names:
            x = self._modules[name](x)
        return torch.cat([self._modules[name](x) for name in self.head_names], 1)


class Mixed(nn.Module):
    """A TF-slim "Mixed" module: branches Branch_0, Branch_1, ... on the same input, concatenated."""

    def __init__(self, branches: Sequence[tuple[nn.Module, int]]):
        super().__init__()
        for i, (b, _) in enumerate(branches):
            self.add_module(f"Branch_{i}", b)
        self.out_channels = sum(width for _, width in branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.children()], 1)


def max_pool_branch(in_channels: int, name: str = "MaxPool_1a_3x3") -> tuple[nn.Sequential, int]:
    """A 3x3/2 valid max-pool branch (reductions and stem)."""
    return branch(in_channels, (name, None, 2, "valid"))


def stem_v4(in_chans: int, bn_eps: float = BN_EPS) -> tuple[list[tuple[str, nn.Module]], int]:
    """Fig. 3: 299x299x3 -> 35x35x384 (TF-slim names; "V" of the figure = valid padding)."""
    def one(c_in, name, out, stride=1, padding="valid"):
        return branch(c_in, (name, out, stride, padding), bn_eps=bn_eps)[0][0]

    layers = [("Conv2d_1a_3x3", one(in_chans, "Conv2d_1a_3x3", 32, 2)),  # 149 x 149 x 32
              ("Conv2d_2a_3x3", one(32, "Conv2d_2a_3x3", 32)),  # 147 x 147 x 32
              ("Conv2d_2b_3x3", one(32, "Conv2d_2b_3x3", 64, 1, "same"))]  # 147 x 147 x 64
    mixed_3a = Mixed([max_pool_branch(64, "MaxPool_0a_3x3"),
                      branch(64, ("Conv2d_0a_3x3", 96, 2, "valid"), bn_eps=bn_eps)])  # 73 x 73 x 160
    mixed_4a = Mixed([branch(160, ("Conv2d_0a_1x1", 64), ("Conv2d_1a_3x3", 96, 1, "valid"), bn_eps=bn_eps),
                      branch(160, ("Conv2d_0a_1x1", 64), ("Conv2d_0b_1x7", 64), ("Conv2d_0c_7x1", 64),
                             ("Conv2d_1a_3x3", 96, 1, "valid"), bn_eps=bn_eps)])  # 71 x 71 x 192
    mixed_5a = Mixed([branch(192, ("Conv2d_1a_3x3", 192, 2, "valid"), bn_eps=bn_eps),
                      max_pool_branch(192)])  # 35 x 35 x 384
    return layers + [("Mixed_3a", mixed_3a), ("Mixed_4a", mixed_4a), ("Mixed_5a", mixed_5a)], 384


def block_inception_a(c: int, bn_eps: float = BN_EPS) -> Mixed:
    """Fig. 4 (35x35): 96 | 64 -> 96 | 64 -> 96 -> 96 | avg-pool -> 96."""
    return Mixed([branch(c, ("Conv2d_0a_1x1", 96), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", 64), ("Conv2d_0b_3x3", 96), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", 64), ("Conv2d_0b_3x3", 96), ("Conv2d_0c_3x3", 96), bn_eps=bn_eps),
                  branch(c, ("AvgPool_0a_3x3", None), ("Conv2d_0b_1x1", 96), bn_eps=bn_eps)])


def block_reduction_a(c: int, widths: Sequence[int], bn_eps: float = BN_EPS) -> Mixed:
    """Fig. 7 (35x35 -> 17x17) with Table 1's widths k, l, m, n: 3x3/2 n | 1x1 k -> 3x3 l -> 3x3/2 m | max-pool."""
    k, l, m, n = widths  # noqa: E741  (Table 1's names)
    return Mixed([branch(c, ("Conv2d_1a_3x3", n, 2, "valid"), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", k), ("Conv2d_0b_3x3", l), ("Conv2d_1a_3x3", m, 2, "valid"),
                         bn_eps=bn_eps),
                  max_pool_branch(c)])


def block_inception_b(c: int, bn_eps: float = BN_EPS) -> Mixed:
    """Fig. 5 (17x17): 384 | 192 -> 224 (1x7) -> 256 (7x1) | 192 -> 192 -> 224 -> 224 -> 256 | avg-pool -> 128."""
    return Mixed([branch(c, ("Conv2d_0a_1x1", 384), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", 192), ("Conv2d_0b_1x7", 224), ("Conv2d_0c_7x1", 256), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", 192), ("Conv2d_0b_7x1", 192), ("Conv2d_0c_1x7", 224),
                         ("Conv2d_0d_7x1", 224), ("Conv2d_0e_1x7", 256), bn_eps=bn_eps),
                  branch(c, ("AvgPool_0a_3x3", None), ("Conv2d_0b_1x1", 128), bn_eps=bn_eps)])


def block_reduction_b(c: int, bn_eps: float = BN_EPS) -> Mixed:
    """Fig. 8 (17x17 -> 8x8): 192 -> 3x3/2 192 | 256 -> 256 (1x7) -> 320 (7x1) -> 3x3/2 320 | max-pool."""
    return Mixed([branch(c, ("Conv2d_0a_1x1", 192), ("Conv2d_1a_3x3", 192, 2, "valid"), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", 256), ("Conv2d_0b_1x7", 256), ("Conv2d_0c_7x1", 320),
                         ("Conv2d_1a_3x3", 320, 2, "valid"), bn_eps=bn_eps),
                  max_pool_branch(c)])


def block_inception_c(c: int, bn_eps: float = BN_EPS) -> Mixed:
    """Fig. 6 (8x8): 256 | 384 -> (256 1x3, 256 3x1) | 384 -> 448 (3x1) -> 512 (1x3) -> (256 1x3, 256 3x1) |
    avg-pool -> 256."""
    def fork(trunk: tuple, heads: tuple) -> tuple[Fork, int]:
        t, width = branch(c, *trunk, bn_eps=bn_eps)
        h = nn.Sequential(OrderedDict((name, ConvBNReLU(width, out, _kernel(name), padding=_same(name), bn_eps=bn_eps))
                                      for name, out in heads))
        return Fork(t, h), sum(out for _, out in heads)

    return Mixed([branch(c, ("Conv2d_0a_1x1", 256), bn_eps=bn_eps),
                  fork((("Conv2d_0a_1x1", 384),), (("Conv2d_0b_1x3", 256), ("Conv2d_0c_3x1", 256))),
                  fork((("Conv2d_0a_1x1", 384), ("Conv2d_0b_3x1", 448), ("Conv2d_0c_1x3", 512)),
                       (("Conv2d_0d_1x3", 256), ("Conv2d_0e_3x1", 256))),
                  branch(c, ("AvgPool_0a_3x3", None), ("Conv2d_0b_1x1", 256), bn_eps=bn_eps)])


def inception_cfg(num_classes: int, in_chans: int, input_size: int) -> dict:
    """ImageNet at 299x299, scaled to [-1, 1] as TF-slim's Inception preprocessing does, 87.5% central crop."""
    return make_default_cfg("imagenet", num_classes, in_chans, input_size, mean=(0.5,), std=(0.5,), crop_pct=0.875)


def mixed_names(first: str, count: int) -> list[str]:
    """TF-slim's module names: Mixed_6b, Mixed_6c, ... from `first` = "Mixed_6b"."""
    return [first[:-1] + chr(ord(first[-1]) + i) for i in range(count)]


WeightInit = Literal["variance_scaling", "xavier", "pytorch"]


def _truncated_normal_(w: torch.Tensor, std: float) -> None:
    """N(0, std) truncated at +-2 std, as TensorFlow's `truncated_normal`: draws outside are redrawn (about 5%
    per round). nn.init.trunc_normal_'s inverse-CDF sampling gives the same law but is ~30x slower on CPU."""
    w.normal_(0.0, std)
    if w.is_meta:
        return
    for part in w.view(-1).split(1 << 14):  # small pieces: no fresh full-size temporaries to page in
        outside = part.abs() > 2.0 * std
        while outside.any():
            part[outside] = part.new_empty(int(outside.sum())).normal_(0.0, std)
            outside = part.abs() > 2.0 * std


@torch.no_grad()
def init_tf_slim_(model: nn.Module, conv_init: WeightInit = "variance_scaling") -> None:
    """TF-slim's initialisation of the Inception networks. Convolutions: "variance_scaling" is
    `inception_utils.inception_arg_scope`'s `slim.variance_scaling_initializer()` (factor 2, fan-in, a normal
    of std sqrt(1.3 * 2 / fan_in) truncated at two std, so the draws' std is ~sqrt(2 / fan_in): He), the
    arg scope of Inception-v4; "xavier" is `slim.conv2d`'s own default, `xavier_initializer()` (Glorot
    uniform, +-sqrt(6 / (fan_in + fan_out))), which the released Inception-ResNet-v2 gets because its
    `inception_resnet_v2_arg_scope` names no initialiser. Conv biases (the residual 1x1s) start at 0, BN at
    gamma 1 / beta 0, and the logits (`slim.fully_connected`'s default) Glorot uniform with zero bias.
    "pytorch" leaves PyTorch's defaults."""
    if conv_init not in ("variance_scaling", "xavier", "pytorch"):
        raise ValueError(f"weight_init must be 'variance_scaling', 'xavier' or 'pytorch', got {conv_init!r}")
    if conv_init == "pytorch":
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if conv_init == "variance_scaling":
                std = math.sqrt(1.3 * 2.0 / nn.init._calculate_fan_in_and_fan_out(m.weight)[0])
                _truncated_normal_(m.weight, std)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class InceptionOutputs(NamedTuple):
    """What an Inception network with `aux_logits=True` returns in training mode."""
    logits: torch.Tensor
    aux_logits: torch.Tensor


def aux_head(in_channels: int, num_classes: int, side: int, bn_eps: float = BN_EPS) -> nn.Sequential:
    """TF-slim's AuxLogits on the 17x17 grid (the input of Mixed_7a): 5x5/3 valid average pooling, a 1x1
    conv-BN-ReLU to 128, a conv-BN-ReLU to 768 over the whole remaining map (5x5 at 299), the classifier."""
    pooled = (side - 5) // 3 + 1
    if pooled < 1:
        raise ValueError(f"aux_logits needs a 17x17 grid of at least 5x5 (input_size >= 139); got {side}x{side}")
    return nn.Sequential(OrderedDict(
        AvgPool_1a_5x5=nn.AvgPool2d(5, 3),
        Conv2d_1b_1x1=ConvBNReLU(in_channels, 128, (1, 1), bn_eps=bn_eps),
        Conv2d_2a=ConvBNReLU(128, 768, (pooled, pooled), bn_eps=bn_eps),
        Flatten=nn.Flatten(),
        Logits=nn.Linear(768, num_classes),
    ))


def grid_17_side(input_size: int) -> int:
    """The side of the 17x17 grid at `input_size` (299 -> 17): every stem here takes 299 to 35 through the same
    valid 3x3 / stride-2 steps, and Reduction-A halves it."""
    s = (input_size - 3) // 2 + 1 - 2  # Conv2d_1a_3x3 /2, Conv2d_2a_3x3
    s = (s - 3) // 2 + 1 - 2  # the first 3x3/2 pool (or conv), then a valid 3x3
    s = (s - 3) // 2 + 1  # 35 at 299
    return (s - 3) // 2 + 1


class InceptionClassifier(Classifier):
    """What Inception-v4 and Inception-ResNet share: `features` (the TF-slim-named modules), then global
    average pooling, dropout and the `Logits` layer (Figs. 9 and 15); optionally TF-slim's auxiliary head
    (`AuxLogits`, on the input of Mixed_7a), whose logits `forward` returns beside the main ones in training
    mode (`InceptionOutputs`; TF-slim's train_image_classifier weighs its loss 0.4)."""

    AuxLogits: nn.Module | None

    def _build(self, layers: list[tuple[str, nn.Module]], width: int, num_classes: int, in_chans: int,
               drop_rate: float, input_size: int, weight_init: WeightInit = "variance_scaling",
               aux_logits: bool = False, bn_momentum: float | None = 0.1, bn_scale: bool = True,
               bn_eps: float = BN_EPS) -> None:
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, width
        self.features = nn.Sequential(OrderedDict(layers))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.Logits = nn.Linear(width, num_classes)
        self.default_cfg = inception_cfg(num_classes, in_chans, input_size)
        self.AuxLogits = None
        if aux_logits:
            # the 17x17 grid's width: the input of Mixed_7a's first convolution
            c = next(m.conv.in_channels for m in self.features.Mixed_7a.modules() if isinstance(m, ConvBNReLU))
            self.AuxLogits = aux_head(c, num_classes, grid_17_side(input_size), bn_eps)
        if bn_momentum is not None and not 0.0 <= bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1] (PyTorch's: 1 - TF's decay), got {bn_momentum}")
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
                m.weight.requires_grad_(bn_scale)  # TF-slim's batch_norm has no scale (gamma stays 1)
        init_tf_slim_(self, weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor | InceptionOutputs:
        if not (self.training and self.AuxLogits is not None):
            return self.forward_head(self.forward_features(x))
        aux = None
        for name, layer in self.features.named_children():
            if name == "Mixed_7a":
                aux = self.AuxLogits(x)
            x = layer(x)
        return InceptionOutputs(self.forward_head(x), aux)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.Logits(x)

    classifier_name = "Logits"

    def stage_specs(self) -> list[tuple[str, int, int]]:
        return sequential_stages(self.features, "features", self.in_chans)


class InceptionV4(InceptionClassifier):
    """Inception-v4 of Fig. 9, in TF-slim's layout and names; `forward_features` gives N x 1536 x 8 x 8.

    Args:
        num_classes: classifier outputs (1000 ImageNet classes).
        in_chans: input image channels.
        num_blocks: how many Inception-A, -B and -C modules (Fig. 9: 4, 7, 3).
        reduction_a: Reduction-A's k, l, m, n (Table 1: 192, 224, 256, 384 for Inception-v4).
        drop_rate: dropout before the classifier (Fig. 9: keep 0.8).
        bn_eps: BatchNorm epsilon (TF-slim: 0.001).
        input_size: the native input side (299), recorded in `default_cfg`.
        weight_init: "variance_scaling" (TF-slim's inception arg scope: He fan-in truncated normal convolutions,
            Glorot logits, zero biases), "xavier" (Glorot uniform convolutions) or "pytorch" (PyTorch's
            defaults); see `init_tf_slim_`.
        aux_logits: build TF-slim's auxiliary head on Mixed_6h (the paper draws none; timm has none, so its
            weights import only without it); see `InceptionClassifier`.
        bn_momentum: PyTorch's BN momentum, 1 - TF's decay (TF-slim trains with decay 0.9997: 0.0003).
        bn_scale: BN learns a scale (True, PyTorch's and timm's layout) or keeps gamma at 1, frozen, as TF-slim's
            batch_norm without `scale` (False; the state_dict keeps the ones, so weights load either way).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, num_blocks: Sequence[int] = (4, 7, 3),
                 reduction_a: Sequence[int] = (192, 224, 256, 384), drop_rate: float = 0.2,
                 bn_eps: float = BN_EPS, input_size: int = 299, weight_init: WeightInit = "variance_scaling",
                 aux_logits: bool = False, bn_momentum: float | None = 0.1, bn_scale: bool = True):
        super().__init__()
        if len(num_blocks) != 3 or len(reduction_a) != 4:
            raise ValueError(f"num_blocks needs 3 counts (Inception-A, B, C) and reduction_a 4 widths (k, l, m, n); "
                             f"got {tuple(num_blocks)} and {tuple(reduction_a)}")
        layers, c = stem_v4(in_chans, bn_eps)
        for name in mixed_names("Mixed_5b", num_blocks[0]):
            layers.append((name, block_inception_a(c, bn_eps)))  # 35 x 35 x 384
        layers.append(("Mixed_6a", block := block_reduction_a(c, reduction_a, bn_eps)))
        c = block.out_channels  # 17 x 17 x 1024
        for name in mixed_names("Mixed_6b", num_blocks[1]):
            layers.append((name, block := block_inception_b(c, bn_eps)))
            c = block.out_channels
        layers.append(("Mixed_7a", block := block_reduction_b(c, bn_eps)))
        c = block.out_channels  # 8 x 8 x 1536
        for name in mixed_names("Mixed_7b", num_blocks[2]):
            layers.append((name, block := block_inception_c(c, bn_eps)))
            c = block.out_channels
        self._build(layers, c, num_classes, in_chans, drop_rate, input_size, weight_init, aux_logits, bn_momentum,
                    bn_scale, bn_eps)


@register_model
def inception_v4(**kwargs) -> InceptionV4:
    """Inception-v4 (Fig. 9) as released in TF-slim (= timm's): 4/7/3 Inception-A/B/C; 42,679,816 parameters."""
    model_args = dict(num_blocks=(4, 7, 3), reduction_a=(192, 224, 256, 384))
    return InceptionV4(**dict(model_args, **kwargs))


# timm's inception_v4 (TF-slim's layout) lists the same layers in the same order under numbered names
register_twin("timm", "inception_v4", map_layers_in_order, classifier="Logits")
