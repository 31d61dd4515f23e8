"""NASNet-A (Zoph et al. 2018, "Learning transferable architectures for scalable image recognition"), as
released in TF-slim (`nets/nasnet/nasnet.py`, `nasnet_utils.py`).

A network is N normal cells, a reduction cell, N normal cells, a reduction cell, N normal cells (Fig. 2),
on a CIFAR stem (3x3 convolution + BN) or an ImageNet stem (3x3/2 VALID convolution + BN, then two
reduction cells with 1/4 and 1/2 of the filters). Every cell takes the outputs of the two cells before it
(h, h-1). The filters F of the first stack double at each reduction; "N @ P" names a network by N and its
penultimate width P = 24 F (a normal cell outputs 6 blocks of 4F in the last stack).

The cells follow the released code, which differs in details from the paper's figure:
- a cell first maps h to F channels with ReLU-1x1-BN, and h-1 with ReLU-1x1-BN when its width differs, or
  with a "factorized reduction" (two 1x1 convolutions on the even and the odd pixel grid) when h-1 has twice
  the resolution; the very first cell takes its input itself as h-1, untouched.
- five blocks each add two operations on earlier states; a separable operation is
  (ReLU, depthwise kxk + pointwise 1x1, BN) twice, the first with the cell's stride; a pooling whose input is
  not F wide is followed by a 1x1 convolution + BN; "none" is the identity (ReLU-1x1-BN if it must stride
  or change width). Operations on the cell's inputs stride in a reduction cell, the others do not.
- the output concatenates the states no block used (a factorized reduction first when their shape differs);
- padding is TensorFlow's "SAME": asymmetric for stride 2 on even maps, and the average pools divide by
  the number of real (unpadded) pixels.

The auxiliary head (relu, 5x5/3 average pool, 1x1 conv 128 + BN + ReLU, conv over the remaining map to
768 + BN + ReLU, linear) sits on the last normal cell before the second reduction; its loss weighs 0.4.
In training mode (with `aux_head=True`) `forward` returns `NASNetOutputs(logits, aux_logits)`; in eval
mode the logits alone.

ScheduledDropPath (Sec. 4.1, released code's "v3"): every operation other than "none" is dropped for a
whole example with probability  progress * (cell + 1) / (cells in total) * (1 - drop_path_keep_prob),
and kept outputs are divided by the keep probability. `set_drop_path_progress(fraction of training done)`
sets it; `lightcnn.training.ScheduledDropPath` calls it every batch. Eval never drops.

    model = lightcnn.models.create("nasnet_a_cifar")        # 6 @ 768, 3,346,538 (+1,631,498 aux) params
    model = from_timm("nasnet_a_large", timm.create_model("nasnetalarge", pretrained=True))  # TF-slim's weights
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from functools import partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.models.base import Classifier, is_fx_tracing, make_default_cfg
from lightcnn.models.registry import register_model
from lightcnn.models.weights import load_twin, register_twin


class NASNetOutputs(NamedTuple):
    """What NASNet returns while training with its auxiliary head."""

    logits: torch.Tensor
    aux_logits: torch.Tensor


class CellSpec(NamedTuple):
    """A cell as the released code writes it: 5 blocks of (left op, right op) on hidden states (0 = h after
    its 1x1, 1 = h-1, 2.. = earlier blocks); the states marked unused are concatenated into the output."""

    operations: tuple[str, ...]
    hiddenstate_indices: tuple[int, ...]
    used_hiddenstates: tuple[int, ...]


NORMAL_CELL = CellSpec(
    ("separable_5x5_2", "separable_3x3_2", "separable_5x5_2", "separable_3x3_2", "avg_pool_3x3", "none",
     "avg_pool_3x3", "avg_pool_3x3", "separable_3x3_2", "none"),
    (0, 1, 1, 1, 0, 1, 1, 1, 0, 0),
    (1, 0, 0, 0, 0, 0, 0),
)
REDUCTION_CELL = CellSpec(
    ("separable_5x5_2", "separable_7x7_2", "max_pool_3x3", "separable_7x7_2", "avg_pool_3x3", "separable_5x5_2",
     "none", "avg_pool_3x3", "separable_3x3_2", "max_pool_3x3"),
    (0, 1, 0, 1, 0, 1, 3, 2, 2, 0),
    (1, 1, 1, 0, 0, 0, 0),
)

NormLayer = Callable[[int], nn.Module]


# --- TensorFlow "SAME" padding -------------------------------------------------------------------------


def same_pads(height: int, width: int, kernel_size: int, stride: int) -> tuple[int, int, int, int]:
    """F.pad's (left, right, top, bottom) for TensorFlow's SAME padding: the output is ceil(in / stride)
    and the odd pixel of padding goes to the right/bottom."""
    def one(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        return total // 2, total - total // 2

    return (*one(width), *one(height))


torch.fx.wrap("same_pads")  # torch.fx (create_feature_extractor) records the call rather than tracing into it


class Conv2dSame(nn.Conv2d):
    """A bias-free convolution with SAME padding (static for stride 1, computed from the input otherwise)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2 if stride == 1 else 0,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, same_pads(x.shape[-2], x.shape[-1], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


class PoolSame(nn.Module):
    """Max or average pooling with SAME padding; the average counts only real pixels (tf.nn.avg_pool)."""

    def __init__(self, kind: Literal["max", "avg"], kernel_size: int, stride: int):
        super().__init__()
        self.kind, self.kernel_size, self.stride = kind, kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        if s == 1:  # symmetric padding k // 2
            if self.kind == "max":
                return F.max_pool2d(x, k, 1, k // 2)
            return F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
        pads = same_pads(x.shape[-2], x.shape[-1], k, s)
        if self.kind == "max":
            return F.max_pool2d(F.pad(x, pads, value=float("-inf")), k, s)
        # Sum over the window, divided by the count of unpadded pixels in it (asymmetric pads included).
        total = F.avg_pool2d(F.pad(x, pads), k, s, divisor_override=1)
        count = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), pads), k, s, divisor_override=1)
        return total / count

    def extra_repr(self) -> str:
        return f"{self.kind}, kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME"


# --- blocks --------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Drops the whole output of an operation for each example with probability `drop_prob`, dividing kept
    outputs by the keep probability (the released `drop_path`); identity in eval mode.

    `drop_prob` is a buffer (a 0-d tensor, not saved in the state_dict) set by
    `NASNet.set_drop_path_progress`, so that changing it neither retraces nor recompiles `torch.compile`d
    models. `max_drop_prob` is its value at the end of the schedule, fixed by the cell's depth."""

    def __init__(self, max_drop_prob: float):
        super().__init__()
        self.max_drop_prob = max_drop_prob
        self.register_buffer("drop_prob", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # rand_like of an (N, 1, 1, 1) slice rather than rand(x.shape[0], ...): torch.fx can trace it
        kept = torch.rand_like(x[:, :1, :1, :1], dtype=torch.float32) < keep
        return x * (kept / keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_drop_prob={self.max_drop_prob:.4f}"


class ReLUConvBN(nn.Sequential):
    """ReLU, bias-free kxk convolution (SAME), BN: the released code's `1x1`/`prev_1x1` + BN."""

    def __init__(self, in_channels: int, out_channels: int, norm: NormLayer, kernel_size: int = 1, stride: int = 1):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = Conv2dSame(in_channels, out_channels, kernel_size, stride)
        self.bn = norm(out_channels)


class SeparableConv2d(nn.Sequential):
    """slim.separable_conv2d with depth multiplier 1: depthwise kxk (with the stride), then pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.depthwise = Conv2dSame(in_channels, in_channels, kernel_size, stride, groups=in_channels)
        self.pointwise = Conv2dSame(in_channels, out_channels, 1)


class StackedSeparable(nn.Sequential):
    """`separable_kxk_2`: (ReLU, separable conv, BN) twice; only the first strides or changes the width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, norm: NormLayer,
                 num_layers: int = 2):
        super().__init__()
        for i in range(1, num_layers + 1):
            self.add_module(f"act_{i}", nn.ReLU(inplace=i > 1))  # the first ReLU reads a shared state
            self.add_module(f"separable_{i}", SeparableConv2d(in_channels if i == 1 else out_channels, out_channels,
                                                              kernel_size, stride if i == 1 else 1))
            self.add_module(f"bn_sep_{i}", norm(out_channels))


class PoolOp(nn.Sequential):
    """`avg_pool_3x3` / `max_pool_3x3`, then a 1x1 convolution + BN if the input is not the cell's width."""

    def __init__(self, kind: Literal["max", "avg"], kernel_size: int, stride: int, in_channels: int,
                 out_channels: int, norm: NormLayer):
        super().__init__()
        self.pool = PoolSame(kind, kernel_size, stride)
        if in_channels != out_channels:
            self.conv = Conv2dSame(in_channels, out_channels, 1)
            self.bn = norm(out_channels)


class FactorizedReduction(nn.Module):
    """Halves the resolution without dropping pixels (released `factorized_reduction`): 1x1 convolutions to
    half the filters on the even grid and on the grid shifted by one pixel, concatenated, BN. With
    `stride=1` a single 1x1 convolution + BN. `relu` puts a ReLU first (when it preprocesses h-1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormLayer, relu: bool):
        super().__init__()
        self.relu, self.stride = relu, stride
        if stride == 1:
            self.path_conv = Conv2dSame(in_channels, out_channels, 1)
            self.path_bn = norm(out_channels)
            return
        if out_channels % 2:
            raise ValueError(f"a factorized reduction needs an even number of filters, got {out_channels}")
        self.path1_conv = Conv2dSame(in_channels, out_channels // 2, 1)
        self.path2_conv = Conv2dSame(in_channels, out_channels // 2, 1)
        self.final_path_bn = norm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu:
            x = F.relu(x)
        if self.stride == 1:
            return self.path_bn(self.path_conv(x))
        path1 = self.path1_conv(x[:, :, ::2, ::2])
        # Shift by one pixel (pad right/bottom with zeros, drop the first row/column), then subsample.
        path2 = self.path2_conv(F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))[:, :, ::2, ::2])
        return self.final_path_bn(torch.cat([path1, path2], 1))


def _operation(name: str, in_channels: int, filters: int, stride: int, norm: NormLayer,
               max_drop_prob: float) -> nn.Module:
    """One of a cell's operations by its released name, followed by drop-path unless it is "none"."""
    if name == "none":
        if stride > 1 or in_channels != filters:
            return ReLUConvBN(in_channels, filters, norm, stride=stride)
        return nn.Identity()
    match = re.fullmatch(r"separable_(\d)x\d_(\d)", name)
    if match:
        k, layers = int(match[1]), int(match[2])
        op = StackedSeparable(in_channels, filters, k, stride, norm, layers)
    else:
        match = re.fullmatch(r"(avg|max)_pool_(\d)x\d", name)
        if not match:
            raise ValueError(f"unknown NASNet operation {name!r}")
        op = PoolOp(match[1], int(match[2]), stride, in_channels, filters, norm)
    if max_drop_prob > 0:
        op.add_module("drop_path", DropPath(max_drop_prob))
    return op


class NASNetACell(nn.Module):
    """A normal (`stride=1`) or reduction (`stride=2`) cell built from its `CellSpec`.

    Args:
        spec: the cell's operations and wiring (`NORMAL_CELL`, `REDUCTION_CELL`).
        in_channels: width of h, the previous cell's output.
        prev_channels: width of h-1, or None when h-1 is h itself (the first cell; left untouched).
        prev_reduced: h-1 has twice the resolution of h (a reduction lies between them).
        filters: F of this cell (the width of each block).
        stride: 2 in reduction cells (for the operations on h and h-1).
        norm: the BatchNorm factory.
        max_drop_prob: drop-path probability of this cell's operations at the end of the schedule.
    """

    def __init__(self, spec: CellSpec, in_channels: int, prev_channels: int | None, prev_reduced: bool,
                 filters: int, stride: int, norm: NormLayer, max_drop_prob: float = 0.0):
        super().__init__()
        self.spec = spec
        self.conv_1x1 = ReLUConvBN(in_channels, filters, norm)
        if prev_channels is None:
            prev_out = in_channels
        elif prev_reduced:
            self.prev_reduction = FactorizedReduction(prev_channels, filters, 2, norm, relu=True)
            prev_out = filters
        elif prev_channels != filters:
            self.conv_prev_1x1 = ReLUConvBN(prev_channels, filters, norm)
            prev_out = filters
        else:
            prev_out = prev_channels
        channels, level = [filters, prev_out], [0, 0]  # width and stride-2 count of each hidden state
        for block in range(5):
            levels = []
            for side, i in (("left", 2 * block), ("right", 2 * block + 1)):
                state = spec.hiddenstate_indices[i]
                op_stride = stride if state < 2 else 1  # only the cell's inputs are strided
                self.add_module(f"comb_iter_{block}_{side}",
                                _operation(spec.operations[i], channels[state], filters, op_stride, norm,
                                           max_drop_prob))
                levels.append(level[state] + (op_stride > 1))
            if levels[0] != levels[1]:
                raise ValueError(f"block {block} adds maps of different resolutions")
            channels.append(filters)
            level.append(levels[0])
        self.unused = [i for i, used in enumerate(spec.used_hiddenstates) if not used]
        for i in self.unused:
            if channels[i] != filters or level[i] != level[-1]:
                self.add_module(f"reduction_{i}", FactorizedReduction(channels[i], filters, 2 if level[i] != level[-1]
                                                                      else 1, norm, relu=False))
        self.out_channels = filters * len(self.unused)

    def forward(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "prev_reduction"):
            prev = self.prev_reduction(prev)
        elif hasattr(self, "conv_prev_1x1"):
            prev = self.conv_prev_1x1(prev)
        states = [self.conv_1x1(x), prev]
        idx = self.spec.hiddenstate_indices
        for block in range(5):
            left = getattr(self, f"comb_iter_{block}_left")(states[idx[2 * block]])
            right = getattr(self, f"comb_iter_{block}_right")(states[idx[2 * block + 1]])
            states.append(left + right)
        outs = [getattr(self, f"reduction_{i}")(states[i]) if hasattr(self, f"reduction_{i}") else states[i]
                for i in self.unused]
        return torch.cat(outs, 1)


class AuxHead(nn.Module):
    """The released auxiliary head: ReLU, 5x5/3 VALID average pool, 1x1 conv to 128 + BN + ReLU, a VALID
    convolution over the whole remaining `map_size` x `map_size` map to 768 + BN + ReLU, linear."""

    def __init__(self, in_channels: int, num_classes: int, map_size: int, norm: NormLayer):
        super().__init__()
        self.map_size = map_size
        self.pool = nn.AvgPool2d(5, 3)
        self.proj = nn.Conv2d(in_channels, 128, 1, bias=False)
        self.aux_bn0 = norm(128)
        self.conv = nn.Conv2d(128, 768, map_size, bias=False)
        self.aux_bn1 = norm(768)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(x))
        if not is_fx_tracing() and x.shape[-2:] != (self.map_size, self.map_size):
            raise ValueError(f"the auxiliary head was built for a {self.map_size}x{self.map_size} map after its pool "
                             f"but got {tuple(x.shape[-2:])}: build the model with image_size set to the input side "
                             f"you train at, or aux_head=False")
        x = F.relu(self.aux_bn0(self.proj(x)))
        x = F.relu(self.aux_bn1(self.conv(x)))  # N x 768 x 1 x 1
        return self.fc(torch.flatten(x, 1))


# --- the network ---------------------------------------------------------------------------------------


def _num_conv_filters(penultimate_filters: int, num_normal_cells: int, num_reduction_layers: int,
                      filter_scaling_rate: float, stem: str, first_cell_prev: str, drop_path_keep_prob: float) -> int:
    """The first stack's filters F = P / (6 * filter_scaling_rate ** num_reduction_layers), once the
    arguments of `NASNet` are checked."""
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    if first_cell_prev not in ("released", "relu_conv_bn"):
        raise ValueError(f"first_cell_prev must be 'released' or 'relu_conv_bn', got {first_cell_prev!r}")
    if not 0.0 < drop_path_keep_prob <= 1.0:
        raise ValueError(f"drop_path_keep_prob must be in (0, 1], got {drop_path_keep_prob}")
    if num_normal_cells < 1 or num_reduction_layers < 0:
        raise ValueError(f"need num_normal_cells >= 1 and num_reduction_layers >= 0, got "
                         f"{num_normal_cells}, {num_reduction_layers}")
    divisor = 6 * filter_scaling_rate ** num_reduction_layers
    num_conv_filters = penultimate_filters / divisor
    if num_conv_filters != int(num_conv_filters):
        raise ValueError(f"penultimate_filters={penultimate_filters} must be divisible by 6 * "
                         f"filter_scaling_rate ** num_reduction_layers = {divisor:g}")
    return int(num_conv_filters)


def _make_stem(stem: str, in_chans: int, num_conv_filters: int, stem_multiplier: float, image_size: int,
               norm: Callable[[int], nn.Module]) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """The stem (CIFAR: 3x3 SAME conv + BN, F * stem_multiplier filters; ImageNet: 3x3/2 VALID conv + BN,
    32 * stem_multiplier filters) and its output as (width, stride-2 count, side)."""
    seq, side = nn.Sequential(), image_size
    if stem == "cifar":
        stem_filters = int(num_conv_filters * stem_multiplier)
        seq.conv = Conv2dSame(in_chans, stem_filters, 3)
    else:
        stem_filters = int(32 * stem_multiplier)
        seq.conv = nn.Conv2d(in_chans, stem_filters, 3, stride=2, bias=False)  # VALID
        side = (side - 3) // 2 + 1
    seq.bn = norm(stem_filters)
    return seq, (stem_filters, 0, side)


class NASNet(Classifier):
    """NASNet-A "N @ P" as released in TF-slim (`build_nasnet_cifar/mobile/large`).

    Args:
        num_classes: outputs of the classifier (10 for CIFAR-10, 1000 for ImageNet).
        in_chans: input channels.
        num_normal_cells: N, normal cells in each of the three stacks (6 for CIFAR and Large, 4 for Mobile).
        penultimate_filters: P, the width of the last cell's output (768, 4032, 1056); the first stack's filters
            are P / (6 * filter_scaling_rate ** num_reduction_layers).
        stem: "cifar" (3x3 conv + BN) or "imagenet" (3x3/2 VALID conv + BN, two reduction cells).
        stem_multiplier: stem width factor: the CIFAR stem has F * stem_multiplier filters, the ImageNet stem
            32 * stem_multiplier (3.0 for CIFAR and Large, 1.0 for Mobile).
        filter_scaling_rate: filter growth at each reduction (2).
        num_reduction_layers: reduction cells between the stacks (2).
        skip_reduction_layer_input: the first cell after a reduction takes as h-1 the cell before the
            reduction's input, not that input (released: 1 for Large, 0 for CIFAR and Mobile).
        drop_path_keep_prob: keep probability of the last cell at the end of ScheduledDropPath (0.6 CIFAR,
            0.7 Large, 1.0 = off for Mobile).
        drop_rate: dropout before the classifier (1 - dense_dropout_keep_prob: 0 CIFAR, 0.5 ImageNet).
        aux_head: build the auxiliary classifier (used in training mode only).
        image_size: the input side the model is built for (32, 224, 331): sizes the auxiliary head's last
            convolution and `default_cfg`.
        bn_eps, bn_momentum: BatchNorm epsilon and PyTorch momentum (released: 1e-5 and 1 - 0.9 for CIFAR,
            1e-3 and 1 - 0.9997 for ImageNet).
        first_cell_prev: h-1 of the very first cell, which is the stem output itself: "released" passes it on
            untouched (so that cell's operations on h-1 read the stem's width, as TF-slim's
            `_reduce_prev_layer(None, ...)` does), "relu_conv_bn" first maps it to F with ReLU-1x1-BN like every
            later h-1 of another width (the wiring of many re-implementations; 18,304 fewer parameters and
            18.3M fewer MACs for 6 @ 768 on CIFAR).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, num_normal_cells: int = 6,
                 penultimate_filters: int = 768, stem: Literal["cifar", "imagenet"] = "cifar",
                 stem_multiplier: float = 3.0, filter_scaling_rate: float = 2.0, num_reduction_layers: int = 2,
                 skip_reduction_layer_input: bool = False, drop_path_keep_prob: float = 0.6, drop_rate: float = 0.0,
                 aux_head: bool = True, image_size: int | None = None, bn_eps: float = 1e-5,
                 bn_momentum: float = 0.1, first_cell_prev: Literal["released", "relu_conv_bn"] = "released"):
        super().__init__()
        num_conv_filters = _num_conv_filters(penultimate_filters, num_normal_cells, num_reduction_layers,
                                             filter_scaling_rate, stem, first_cell_prev, drop_path_keep_prob)
        image_size = image_size or (32 if stem == "cifar" else 224)
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, penultimate_filters
        self.drop_path_progress = 0.0
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        self.stem, stem_output = _make_stem(stem, in_chans, num_conv_filters, stem_multiplier, image_size, norm)
        self.cells = nn.ModuleDict()
        self._prev_offset: dict[str, int] = {}  # where each cell finds h-1 in the list of outputs
        self.aux = None
        self._aux_after = None
        width = self._stack_cells(stem_output, num_conv_filters, num_normal_cells, num_reduction_layers,
                                  filter_scaling_rate, imagenet_stem=stem == "imagenet",
                                  skip_reduction_layer_input=skip_reduction_layer_input,
                                  drop_path_keep_prob=drop_path_keep_prob, first_cell_prev=first_cell_prev,
                                  aux_head=aux_head, num_classes=num_classes, image_size=image_size, norm=norm)
        if width != penultimate_filters:
            raise AssertionError(f"built {width} final channels, expected {penultimate_filters}")

        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(penultimate_filters, num_classes)
        # TF-slim's ImageNet pipeline (inception preprocessing) scales the images to [-1, 1].
        norm_stats = dict(mean=(0.5,), std=(0.5,)) if stem == "imagenet" else {}
        self.default_cfg = make_default_cfg("imagenet" if stem == "imagenet" else "cifar", num_classes, in_chans,
                                            image_size, **norm_stats)
        self._init_released()

    def _stack_cells(self, stem_output: tuple[int, int, int], num_conv_filters: int, num_normal_cells: int,
                     num_reduction_layers: int, filter_scaling_rate: float, *, imagenet_stem: bool,
                     skip_reduction_layer_input: bool, drop_path_keep_prob: float, first_cell_prev: str,
                     aux_head: bool, num_classes: int, image_size: int, norm: Callable[[int], nn.Module]) -> int:
        """The released `build_nasnet_base`: the ImageNet stem's two reduction cells, then the stacks of
        normal cells with a reduction cell between them, and the auxiliary head after the second stack.
        Returns the last cell's width."""
        num_cells = (num_reduction_layers + 1) * num_normal_cells  # the released `num_cells` (18 for 6 @ P)
        # calc_reduction_layers: the normal-cell indices before which a reduction cell is inserted.
        reduction_indices = [int(k / (num_reduction_layers + 1) * num_cells)
                             for k in range(1, num_reduction_layers + 1)]
        total_cells = num_cells + num_reduction_layers + (2 if imagenet_stem else 0)
        # Outputs as the released `cell_outputs`: (width, stride-2 count, side) for each, None at the start.
        outputs: list[tuple[int, int, int] | None] = [None, stem_output]

        def add_cell(name: str, spec: CellSpec, filters: int, stride: int, prev_offset: int) -> None:
            net, prev = outputs[-1], outputs[prev_offset]
            if prev is None and first_cell_prev == "relu_conv_bn":
                prev = net  # h-1 is the stem output, treated like any other h-1
            # the released `true_cell_num` (cells built so far) sets the depth scaling of drop-path
            max_drop = (len(self.cells) + 1) / total_cells * (1.0 - drop_path_keep_prob)
            self.cells[name] = NASNetACell(spec, net[0], None if prev is None else prev[0],
                                           prev is not None and prev[1] < net[1], filters, stride, norm,
                                           max_drop if drop_path_keep_prob < 1 else 0.0)
            self._prev_offset[name] = prev_offset
            outputs.append((self.cells[name].out_channels, net[1] + (stride > 1), math.ceil(net[2] / stride)))

        if imagenet_stem:
            scaling = 1.0 / filter_scaling_rate ** 2
            for i in range(2):
                add_cell(f"cell_stem_{i}", REDUCTION_CELL, int(num_conv_filters * scaling), 2, -2)
                scaling *= filter_scaling_rate
        aux_after = f"cell_{reduction_indices[1] - 1}" if len(reduction_indices) >= 2 else None
        scaling = 1.0
        for cell_num in range(num_cells):
            prev_offset = -2
            if cell_num in reduction_indices:
                scaling *= filter_scaling_rate
                add_cell(f"reduction_cell_{reduction_indices.index(cell_num)}", REDUCTION_CELL,
                         int(num_conv_filters * scaling), 2, -2)
                # h-1 of the next cell: the reduction's input, or with skip the output before that.
                prev_offset = -3 if skip_reduction_layer_input else -2
            add_cell(f"cell_{cell_num}", NORMAL_CELL, int(num_conv_filters * scaling), 1, prev_offset)
            if aux_head and f"cell_{cell_num}" == aux_after:
                channels, _, aux_side = outputs[-1]
                map_size = (aux_side - 5) // 3 + 1
                if map_size < 1:
                    raise ValueError(f"image_size={image_size} leaves a {aux_side}x{aux_side} map at the auxiliary "
                                     f"head, smaller than its 5x5 pool: use a larger image_size or aux_head=False")
                self.aux = AuxHead(channels, num_classes, map_size, norm)
                self._aux_after = aux_after
        return outputs[-1][0]

    @torch.no_grad()
    def _init_released(self) -> None:
        """The released initialiser: variance scaling on fan-out (factor 2, truncated normal with std
        sqrt(1.3 * 2 / fan_out), cut at 2 std) for convolutions and the linear layers; BN at 1 and 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_out = m.out_features if isinstance(m, nn.Linear) else (
                    m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])
                std = math.sqrt(1.3 * 2.0 / fan_out)
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_drop_path_progress(self, fraction: float) -> None:
        """Set ScheduledDropPath to `fraction` of training done (clipped to 1, as the released
        min(1, step / total_training_steps)): each operation then drops with probability
        fraction * (its cell + 1) / (cells in total) * (1 - drop_path_keep_prob). Acts in training only."""
        fraction = float(fraction)
        if not fraction >= 0.0:  # also catches NaN
            raise ValueError(f"drop-path progress must be a fraction of training >= 0, got {fraction}")
        self.drop_path_progress = min(fraction, 1.0)
        for m in self.modules():
            if isinstance(m, DropPath):
                m.drop_prob.fill_(self.drop_path_progress * m.max_drop_prob)

    def _features(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs: list[torch.Tensor | None] = [None, self.stem(x)]
        aux = None
        for name, cell in self.cells.items():
            net, prev = outputs[-1], outputs[self._prev_offset[name]]
            outputs = outputs[-2:] + [cell(net, net if prev is None else prev)]  # at most 3 back are needed
            if with_aux and name == self._aux_after:
                aux = self.aux(outputs[-1])
        return F.relu(outputs[-1]), aux

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.global_pool(x), 1))
        return x if pre_logits else self.fc(x)

    def stage_specs(self) -> list[tuple[str, int, int]]:
        """The stem (ImageNet), and the last cell before each reduction cell and at the end."""
        reduction = self.stem.conv.stride[0]
        specs, prev = [], ("stem", self.stem.conv.out_channels, reduction)
        for name, cell in self.cells.items():
            if name.startswith(("cell_stem_", "reduction_cell_")):  # stride 2
                if reduction > 1 or prev[0] != "stem":
                    specs.append(prev)
                reduction *= 2
            prev = (f"cells.{name}", cell.out_channels, reduction)
        return specs + [prev]

    def aux_classifier_names(self) -> list[str]:
        return [] if self.aux is None else ["aux.fc"]

    def forward(self, x: torch.Tensor) -> torch.Tensor | NASNetOutputs:
        with_aux = self.training and self.aux is not None
        x, aux = self._features(x, with_aux)
        logits = self.forward_head(x)
        return NASNetOutputs(logits, aux) if with_aux else logits


@register_model
def nasnet_a_cifar(**kwargs) -> NASNet:
    """NASNet-A 6 @ 768 on CIFAR (Table 1: 3.3M parameters, 3.41% error) as released in TF-slim: the first
    cell's h-1 is the stem output, passed on untouched (`_reduce_prev_layer(None, ...)`); 3,346,538 parameters
    (+1,631,498 in the auxiliary head) and 0.544 GMACs at 32x32. `first_cell_prev="relu_conv_bn"` maps that
    input to F channels with ReLU-1x1-BN like every other h-1 of another width (the wiring of many
    re-implementations): 3,328,234 parameters and 0.526 GMACs; the cells are the same."""
    model_args = dict(num_classes=10, num_normal_cells=6, penultimate_filters=768, stem="cifar", stem_multiplier=3.0,
                      skip_reduction_layer_input=False, drop_path_keep_prob=0.6, drop_rate=0.0, image_size=32,
                      bn_eps=1e-5, bn_momentum=0.1, first_cell_prev="released")
    return NASNet(**dict(model_args, **kwargs))


@register_model
def nasnet_a_mobile(**kwargs) -> NASNet:
    """NASNet-A 4 @ 1056 on ImageNet at 224 (Table 3: 5.3M parameters, 564M mult-adds); 5,289,978 parameters
    (+2,411,240 auxiliary), 0.5636 GMACs."""
    model_args = dict(num_classes=1000, num_normal_cells=4, penultimate_filters=1056, stem="imagenet",
                      stem_multiplier=1.0, skip_reduction_layer_input=False, drop_path_keep_prob=1.0, drop_rate=0.5,
                      image_size=224, bn_eps=1e-3, bn_momentum=3e-4)
    return NASNet(**dict(model_args, **kwargs))


@register_model
def nasnet_a_large(**kwargs) -> NASNet:
    """NASNet-A 6 @ 4032 on ImageNet at 331 (Table 2: 88.9M parameters, 23.8B mult-adds, 17.3/3.8% error);
    88,753,150 parameters (+4,567,784 auxiliary), 23.78 GMACs; timm's `nasnetalarge` weights load with
    `from_timm("nasnet_a_large", timm_model)`."""
    model_args = dict(num_classes=1000, num_normal_cells=6, penultimate_filters=4032, stem="imagenet",
                      stem_multiplier=3.0, skip_reduction_layer_input=True, drop_path_keep_prob=0.7, drop_rate=0.5,
                      image_size=331, bn_eps=1e-3, bn_momentum=3e-4)
    return NASNet(**dict(model_args, **kwargs))


# --- weights from timm's `nasnetalarge` (Cadene's port of the TF-slim checkpoint) -----------------------

_TIMM_RENAMES = (
    (r"^conv0\.conv\.", "stem.conv."),
    (r"^conv0\.bn\.", "stem.bn."),
    (r"^((?:reduction_)?cell_(?:stem_)?\d+)\.", r"cells.\1."),
    (r"\.path_1\.conv\.", ".prev_reduction.path1_conv."),
    (r"\.path_2\.conv\.", ".prev_reduction.path2_conv."),
    (r"\.final_path_bn\.", ".prev_reduction.final_path_bn."),
    (r"\.depthwise_conv2d\.", ".depthwise."),
    (r"\.pointwise_conv2d\.", ".pointwise."),
    (r"^last_linear\.", "fc."),
)


def convert_timm_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's `nasnetalarge` state_dict under our keys: the layers are the same, only the names differ
    (`load_twin` checks that every key and shape fits `model`)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _TIMM_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


# timm has no auxiliary head, so its twin is built without one. The result computes what the TF-slim
# checkpoint computes; it equals timm's outputs except at the borders of the stride-2 average pools, where
# timm counts the zero padding and TensorFlow (and this model) average over the real pixels only.
register_twin("timm", "nasnet_a_large", convert_timm_state_dict, classifier="fc", aux_head=False)


def nasnet_from_timm(timm_model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], load_classifier: bool = True,
                     **overrides) -> NASNet:
    """`nasnet_a_large` (without the auxiliary head) with the weights of timm's `nasnetalarge`:
    `lightcnn.models.weights.from_timm("nasnet_a_large", ...)`. The weights expect inputs scaled to
    [-1, 1] (mean = std = 0.5), as `default_cfg` says."""
    return load_twin("timm", "nasnet_a_large", timm_model_or_state_dict, load_classifier, **overrides)
