"""Inception-ResNet (Szegedy, Ioffe, Vanhoucke, Alemi 2016, "Inception-v4, Inception-ResNet and the impact
of residual connections on learning"), Sec. 3.2-3.3.

Each Inception-ResNet module computes x + s * Conv2d_1x1(concat(branches(x))) followed by a ReLU: the
branches are conv-BN-ReLU units, and the 1x1 convolution (with bias, no BN, no activation: "1x1 Conv,
Linear" in the figures) matches the branches' width to the input's before the addition. The residual is
scaled by s (Sec. 3.3: 0.1 to 0.3 "stabilises" training; the released v2 uses 0.17, 0.10 and 0.20 at
35x35, 17x17 and 8x8, which the paper-figure models here reuse because the paper gives no per-network
value). BatchNorm (eps 0.001 as TF-slim) sits on the conv units only, "not on top of the summations".

Initialisation (`weight_init`): TF-slim's. The released v2 (`inception_resnet_v2_arg_scope`) sets no
initialiser, so its convolutions get `slim.conv2d`'s default, Glorot uniform ("xavier"); the paper-figure
models, which have no released code, take the shared Inception arg scope (`inception_utils`: He fan-in
truncated normal, "variance_scaling"), as Inception-v4. Both: zero biases (the residual 1x1s) and Glorot
uniform logits.

* `inception_resnet_v2`: as released in TF-slim (`nets/inception_resnet_v2.py`) and timm, whose weights
  import: TF-slim's own stem ending in Mixed_5b (320 channels), 10/20/10 modules of 320/1088/2080
  channels, the last module linear with scale 1, a 1x1 convolution to 1536, average pooling, dropout
  (keep 0.8). 55,843,464 parameters, 13.16 GMACs at 299. Its auxiliary head (TF-slim, on Mixed_6a's
  Repeat_1) is left out unless `aux_logits=True`, as timm does and the paper describes none.
* `inception_resnet_v2_paper`: as drawn in Fig. 15: the Inception-v4 stem (Fig. 3, 384 channels),
  5 x Inception-ResNet-A (Fig. 16), Reduction-A (Fig. 7; k, l, m, n = 256, 256, 384, 384), 10 x B
  (Fig. 17), Reduction-B (Fig. 18), 5 x C (Fig. 19). The residual 1x1 convolutions project to the
  trunk's width, 384/1152/2144 (the figures' 1154 and 2048 cannot be added to 1152 and 2144 maps).
  32,433,928 parameters, 9.26 GMACs.
* `inception_resnet_v1`: Fig. 15 with the Inception-ResNet-v1 modules: the stem of Fig. 14 (256
  channels), 5 x A (Fig. 10), Reduction-A (k, l, m, n = 192, 192, 256, 384), 10 x B (Fig. 11),
  Reduction-B (Fig. 12), 5 x C (Fig. 13): 256/896/1792 channels. 22,756,328 parameters, 6.21 GMACs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Sequence

import torch
from torch import nn

from lightcnn.models.inception_v4 import (
    BN_EPS,
    InceptionClassifier,
    Mixed,
    WeightInit,
    block_reduction_a,
    branch,
    max_pool_branch,
    stem_v4,
)
from lightcnn.models.registry import register_model
from lightcnn.models.weights import map_layers_in_order, register_twin


class InceptionResNetBlock(nn.Module):
    """x + scale * Conv2d_1x1(concat(Branch_0(x), Branch_1(x), ...)), then ReLU unless `activation=False`
    (the released v2's last module). TF-slim's block35 / block17 / block8."""

    def __init__(self, channels: int, branches: Sequence[tuple[nn.Module, int]], scale: float, activation: bool = True):
        super().__init__()
        for i, (b, _) in enumerate(branches):
            self.add_module(f"Branch_{i}", b)
        self.num_branches, self.scale = len(branches), scale
        self.Conv2d_1x1 = nn.Conv2d(sum(width for _, width in branches), channels, 1)  # matches the trunk's width
        self.relu = nn.ReLU(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = torch.cat([self._modules[f"Branch_{i}"](x) for i in range(self.num_branches)], 1)
        return self.relu(x + self.scale * self.Conv2d_1x1(up))


def block35(c: int, widths: Sequence[int], scale: float, bn_eps: float = BN_EPS) -> InceptionResNetBlock:
    """Inception-ResNet-A (35x35; Figs. 10, 16): b0 | b1a -> b1b (3x3) | b2a -> b2b (3x3) -> b2c (3x3)."""
    b0, b1a, b1b, b2a, b2b, b2c = widths
    return InceptionResNetBlock(c, [
        branch(c, ("Conv2d_1x1", b0), bn_eps=bn_eps),
        branch(c, ("Conv2d_0a_1x1", b1a), ("Conv2d_0b_3x3", b1b), bn_eps=bn_eps),
        branch(c, ("Conv2d_0a_1x1", b2a), ("Conv2d_0b_3x3", b2b), ("Conv2d_0c_3x3", b2c), bn_eps=bn_eps),
    ], scale)


def block17(c: int, widths: Sequence[int], scale: float, bn_eps: float = BN_EPS) -> InceptionResNetBlock:
    """Inception-ResNet-B (17x17; Figs. 11, 17): b0 | b1a -> b1b (1x7) -> b1c (7x1)."""
    b0, b1a, b1b, b1c = widths
    return InceptionResNetBlock(c, [
        branch(c, ("Conv2d_1x1", b0), bn_eps=bn_eps),
        branch(c, ("Conv2d_0a_1x1", b1a), ("Conv2d_0b_1x7", b1b), ("Conv2d_0c_7x1", b1c), bn_eps=bn_eps),
    ], scale)


def block8(c: int, widths: Sequence[int], scale: float, activation: bool = True,
           bn_eps: float = BN_EPS) -> InceptionResNetBlock:
    """Inception-ResNet-C (8x8; Figs. 13, 19): b0 | b1a -> b1b (1x3) -> b1c (3x1)."""
    b0, b1a, b1b, b1c = widths
    return InceptionResNetBlock(c, [
        branch(c, ("Conv2d_1x1", b0), bn_eps=bn_eps),
        branch(c, ("Conv2d_0a_1x1", b1a), ("Conv2d_0b_1x3", b1b), ("Conv2d_0c_3x1", b1c), bn_eps=bn_eps),
    ], scale, activation)


def block_reduction_b(c: int, widths: Sequence[int], bn_eps: float = BN_EPS) -> Mixed:
    """Reduction-B of Inception-ResNet (17x17 -> 8x8; Figs. 12, 18): b0a -> 3x3/2 b0b | b1a -> 3x3/2 b1b |
    b2a -> 3x3 b2b -> 3x3/2 b2c | 3x3/2 max-pool."""
    b0a, b0b, b1a, b1b, b2a, b2b, b2c = widths
    return Mixed([branch(c, ("Conv2d_0a_1x1", b0a), ("Conv2d_1a_3x3", b0b, 2, "valid"), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", b1a), ("Conv2d_1a_3x3", b1b, 2, "valid"), bn_eps=bn_eps),
                  branch(c, ("Conv2d_0a_1x1", b2a), ("Conv2d_0b_3x3", b2b), ("Conv2d_1a_3x3", b2c, 2, "valid"),
                         bn_eps=bn_eps),
                  max_pool_branch(c, "MaxPool_1a_3x3")])


def _unit(c_in: int, name: str, out: int, stride: int = 1, padding: str = "valid", bn_eps: float = BN_EPS):
    return branch(c_in, (name, out, stride, padding), bn_eps=bn_eps)[0][0]


def stem_resnet_v1(in_chans: int, bn_eps: float = BN_EPS) -> tuple[list[tuple[str, nn.Module]], int]:
    """Fig. 14: 299x299x3 -> 35x35x256."""
    return [("Conv2d_1a_3x3", _unit(in_chans, "Conv2d_1a_3x3", 32, 2, bn_eps=bn_eps)),  # 149 x 149 x 32
            ("Conv2d_2a_3x3", _unit(32, "Conv2d_2a_3x3", 32, bn_eps=bn_eps)),  # 147 x 147 x 32
            ("Conv2d_2b_3x3", _unit(32, "Conv2d_2b_3x3", 64, 1, "same", bn_eps=bn_eps)),  # 147 x 147 x 64
            ("MaxPool_3a_3x3", nn.MaxPool2d(3, 2)),  # 73 x 73 x 64
            ("Conv2d_3b_1x1", _unit(64, "Conv2d_3b_1x1", 80, bn_eps=bn_eps)),  # 73 x 73 x 80
            ("Conv2d_4a_3x3", _unit(80, "Conv2d_4a_3x3", 192, bn_eps=bn_eps)),  # 71 x 71 x 192
            ("Conv2d_4b_3x3", _unit(192, "Conv2d_4b_3x3", 256, 2, bn_eps=bn_eps))], 256  # 35 x 35 x 256


def stem_resnet_v2_released(in_chans: int, bn_eps: float = BN_EPS) -> tuple[list[tuple[str, nn.Module]], int]:
    """TF-slim's Inception-ResNet-v2 stem: 299x299x3 -> 35x35x320 (Mixed_5b is an Inception-A-like module)."""
    layers = stem_resnet_v1(in_chans, bn_eps)[0][:-1] + [("MaxPool_5a_3x3", nn.MaxPool2d(3, 2))]  # 35 x 35 x 192
    mixed_5b = Mixed([branch(192, ("Conv2d_1x1", 96), bn_eps=bn_eps),
                      branch(192, ("Conv2d_0a_1x1", 48), ("Conv2d_0b_5x5", 64), bn_eps=bn_eps),
                      branch(192, ("Conv2d_0a_1x1", 64), ("Conv2d_0b_3x3", 96), ("Conv2d_0c_3x3", 96), bn_eps=bn_eps),
                      branch(192, ("AvgPool_0a_3x3", None), ("Conv2d_0b_1x1", 64), bn_eps=bn_eps)])
    return layers + [("Mixed_5b", mixed_5b)], 320


STEMS = {"inception_v4": stem_v4, "inception_resnet_v1": stem_resnet_v1, "tf_slim_v2": stem_resnet_v2_released}


class InceptionResNet(InceptionClassifier):
    """Inception-ResNet: stem, A modules at 35x35, Reduction-A, B modules at 17x17, Reduction-B, C modules at
    8x8, average pooling, dropout, classifier. The defaults are Inception-ResNet-v2 as drawn in the paper.

    Args:
        num_classes: classifier outputs (1000 ImageNet classes).
        in_chans: input image channels.
        stem: "inception_v4" (Fig. 3, 384 channels; the paper's v2), "inception_resnet_v1" (Fig. 14, 256) or
            "tf_slim_v2" (the released v2's stem ending in Mixed_5b, 320).
        num_blocks: how many Inception-ResNet-A, -B and -C modules (Fig. 15: 5, 10, 5).
        block_a: widths of Inception-ResNet-A's units: Branch_0 1x1 | Branch_1 1x1, 3x3 | Branch_2 1x1, 3x3, 3x3.
        block_b: widths of Inception-ResNet-B's units: Branch_0 1x1 | Branch_1 1x1, 1x7, 7x1.
        block_c: widths of Inception-ResNet-C's units: Branch_0 1x1 | Branch_1 1x1, 1x3, 3x1.
        reduction_a: Reduction-A's k, l, m, n (Table 1: 192, 192, 256, 384 for v1; 256, 256, 384, 384 for v2).
        reduction_b: Reduction-B's widths: Branch_0 1x1, 3x3/2 | Branch_1 1x1, 3x3/2 | Branch_2 1x1, 3x3, 3x3/2.
        residual_scales: the factor on each residual at 35x35, 17x17 and 8x8 (released v2: 0.17, 0.10, 0.20).
        last_block_linear: the last C module has neither scaling nor ReLU (TF-slim's Block8; the released v2).
        final_conv: width of a 1x1 conv-BN-ReLU after the last module (the released v2's Conv2d_7b_1x1: 1536),
            or None (the paper's figures).
        drop_rate: dropout before the classifier (Fig. 15: keep 0.8).
        bn_eps: BatchNorm epsilon (TF-slim: 0.001).
        input_size: the native input side (299), recorded in `default_cfg`.
        weight_init: "variance_scaling" (TF-slim's `inception_utils` arg scope: He fan-in truncated normal
            convolutions), "xavier" (Glorot uniform convolutions: what the released v2's own
            `inception_resnet_v2_arg_scope` leaves to `slim.conv2d`) or "pytorch"; the logits are Glorot uniform
            and every bias starts at 0 in the first two (`lightcnn.models.inception_v4.init_tf_slim_`).
        aux_logits: build TF-slim's auxiliary head on the 17x17 grid (Repeat_1's output; not in the paper nor
            in timm, whose weights import only without it).
        bn_momentum: PyTorch's BN momentum, 1 - TF's decay (TF-slim trains with decay 0.9997: 0.0003).
        bn_scale: BN learns a scale (True) or keeps gamma at 1, frozen, as TF-slim's batch_norm (False).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 stem: Literal["inception_v4", "inception_resnet_v1", "tf_slim_v2"] = "inception_v4",
                 num_blocks: Sequence[int] = (5, 10, 5),
                 block_a: Sequence[int] = (32, 32, 32, 32, 48, 64), block_b: Sequence[int] = (192, 128, 160, 192),
                 block_c: Sequence[int] = (192, 192, 224, 256), reduction_a: Sequence[int] = (256, 256, 384, 384),
                 reduction_b: Sequence[int] = (256, 384, 256, 288, 256, 288, 320),
                 residual_scales: Sequence[float] = (0.17, 0.10, 0.20), last_block_linear: bool = False,
                 final_conv: int | None = None, drop_rate: float = 0.2, bn_eps: float = BN_EPS,
                 input_size: int = 299, weight_init: WeightInit = "variance_scaling", aux_logits: bool = False,
                 bn_momentum: float | None = 0.1, bn_scale: bool = True):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
        expected = dict(num_blocks=3, block_a=6, block_b=4, block_c=4, reduction_a=4, reduction_b=7,
                        residual_scales=3)
        given = dict(num_blocks=num_blocks, block_a=block_a, block_b=block_b, block_c=block_c, reduction_a=reduction_a,
                     reduction_b=reduction_b, residual_scales=residual_scales)
        for key, n in expected.items():
            if len(given[key]) != n:
                raise ValueError(f"{key} needs {n} numbers (see the InceptionResNet docstring), got "
                                 f"{tuple(given[key])}")
        if last_block_linear and num_blocks[2] < 1:
            raise ValueError("last_block_linear needs at least one Inception-ResNet-C module")
        layers, c = STEMS[stem](in_chans, bn_eps)
        scale_a, scale_b, scale_c = residual_scales
        layers.append(("Repeat", nn.Sequential(OrderedDict(
            (f"block35_{i + 1}", block35(c, block_a, scale_a, bn_eps)) for i in range(num_blocks[0])))))
        layers.append(("Mixed_6a", block := block_reduction_a(c, reduction_a, bn_eps)))
        c = block.out_channels  # 17 x 17
        layers.append(("Repeat_1", nn.Sequential(OrderedDict(
            (f"block17_{i + 1}", block17(c, block_b, scale_b, bn_eps)) for i in range(num_blocks[1])))))
        layers.append(("Mixed_7a", block := block_reduction_b(c, reduction_b, bn_eps)))
        c = block.out_channels  # 8 x 8
        repeated = num_blocks[2] - int(last_block_linear)
        layers.append(("Repeat_2", nn.Sequential(OrderedDict(
            (f"block8_{i + 1}", block8(c, block_c, scale_c, bn_eps=bn_eps)) for i in range(repeated)))))
        if last_block_linear:
            layers.append(("Block8", block8(c, block_c, 1.0, activation=False, bn_eps=bn_eps)))
        if final_conv is not None:
            layers.append(("Conv2d_7b_1x1", _unit(c, "Conv2d_7b_1x1", final_conv, bn_eps=bn_eps)))
            c = final_conv
        self._build(layers, c, num_classes, in_chans, drop_rate, input_size, weight_init, aux_logits, bn_momentum,
                    bn_scale, bn_eps)


@register_model
def inception_resnet_v2(**kwargs) -> InceptionResNet:
    """Inception-ResNet-v2 as released (TF-slim = timm): 10/20/10 modules of 320/1088/2080 channels, scales
    0.17/0.10/0.20, a linear last module and a 1x1 conv to 1536; 55,843,464 parameters. Initialised as the
    released code: its arg scope names no initialiser, so every convolution is Glorot uniform (`xavier`)."""
    model_args = dict(stem="tf_slim_v2", num_blocks=(10, 20, 10), block_a=(32, 32, 32, 32, 48, 64),
                      block_b=(192, 128, 160, 192), block_c=(192, 192, 224, 256), reduction_a=(256, 256, 384, 384),
                      reduction_b=(256, 384, 256, 288, 256, 288, 320), last_block_linear=True, final_conv=1536,
                      weight_init="xavier")
    return InceptionResNet(**dict(model_args, **kwargs))


@register_model
def inception_resnet_v2_paper(**kwargs) -> InceptionResNet:
    """Inception-ResNet-v2 as drawn in the paper (Figs. 3, 7, 15-19): 5/10/5 modules of 384/1152/2144
    channels; 32,433,928 parameters."""
    model_args = dict(stem="inception_v4", num_blocks=(5, 10, 5), block_a=(32, 32, 32, 32, 48, 64),
                      block_b=(192, 128, 160, 192), block_c=(192, 192, 224, 256), reduction_a=(256, 256, 384, 384),
                      reduction_b=(256, 384, 256, 288, 256, 288, 320))
    return InceptionResNet(**dict(model_args, **kwargs))


@register_model
def inception_resnet_v1(**kwargs) -> InceptionResNet:
    """Inception-ResNet-v1 of the paper (Figs. 7, 10-15): 5/10/5 modules of 256/896/1792 channels;
    22,756,328 parameters."""
    model_args = dict(stem="inception_resnet_v1", num_blocks=(5, 10, 5), block_a=(32, 32, 32, 32, 32, 32),
                      block_b=(128, 128, 128, 128), block_c=(192, 192, 192, 192), reduction_a=(192, 192, 256, 384),
                      reduction_b=(256, 384, 256, 256, 256, 256, 256))
    return InceptionResNet(**dict(model_args, **kwargs))


# timm's inception_resnet_v2 (TF-slim's layout) lists the same layers in the same order under its own names
register_twin("timm", "inception_resnet_v2", map_layers_in_order, classifier="Logits")
