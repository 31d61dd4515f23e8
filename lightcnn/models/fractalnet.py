"""FractalNet (Larsson, Maire, Shakhnarovich 2017, "FractalNet: Ultra-deep neural networks without residuals").

A fractal block with C columns follows the expansion rule of Sec. 2, f_1(z) = conv(z) and
f_{C+1}(z) = join(f_C(f_C(z)), conv(z)): column k (numbered 1..C as in Table 3, column 1 the shortest)
has 2^(k-1) convolutions, and a join, the element-wise mean of its inputs, merges every column that
ends at the same depth. The network stacks B blocks, each followed by a 2x2/2 max-pool, and a linear
classifier; `fractalnet20` is the CIFAR network of Sec. 4 (B=5, C=3, 64-128-256-512-512 channels,
depth 4 x 5 = 20).

The layout is that of the authors' generator (gustavla/fractalnet, `generation/fractalnet.py` and
`globals.crox`): each convolution is a 3x3 conv with bias -> dropout (the block's rate) -> BatchNorm ->
ReLU, the pool is applied to every column before the block's last join, the classifier reads the
flattened 512 x 1 x 1 map (average-pooled to 1 x 1 for larger inputs), and weights start from Caffe's
"xavier" filler. Their Caffe BatchNorm has no scale and shift (`bn_affine=False`: 33,714,314 parameters);
by default BN is affine here, 33,734,922 parameters, our count and the one `lightcnn.published` holds. The
paper's 38.6M is reproduced by neither.

Drop-path (Sec. 3.1), training mode only, drawn once per mini-batch:
* local: each join drops each of its inputs with probability `drop_path_rate` (0.15) and averages the
  rest, keeping at least one input;
* global: a single column, the same in every block, is kept for the whole network.
A fraction `global_drop_ratio` (0.5: "half the batches") of the mini-batches uses global drop-path, the
rest local. Eval mode averages every column: deterministic. `model.set_column(k)` (or `column=k`)
runs column k alone, as in Table 3's per-column evaluation; `set_column(None)` restores the fractal.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Sequence

import torch
from torch import nn

from lightcnn.models.base import Classifier, init_caffe_xavier_, make_default_cfg
from lightcnn.models.registry import register_model


class ConvUnit(nn.Sequential):
    """One layer of a column: 3x3 conv (with bias) -> dropout -> BN -> ReLU, the authors' order."""

    def __init__(self, in_channels: int, out_channels: int, drop_rate: float, bn_affine: bool = True):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, padding=1),
            dropout=nn.Dropout(drop_rate),
            bn=nn.BatchNorm2d(out_channels, affine=bn_affine),
            relu=nn.ReLU(inplace=True),
        ))


class FractalJoin(nn.Module):
    """Element-wise mean of the inputs (Sec. 2). In training mode with `drop_path_rate > 0`, each input
    is dropped with that probability, once per mini-batch, and the mean is taken over the survivors; if
    all would be dropped, one chosen uniformly at random is kept (Sec. 3.1, local drop-path)."""

    def __init__(self, drop_path_rate: float = 0.0):
        super().__init__()
        self.drop_path_rate = drop_path_rate

    def kept(self, n: int) -> list[int]:
        """Indices of the inputs that survive local drop-path in this mini-batch."""
        if not self.training or self.drop_path_rate <= 0.0 or n == 1:
            return list(range(n))
        keep = [i for i, u in enumerate(torch.rand(n).tolist()) if u >= self.drop_path_rate]
        return keep or [int(torch.randint(n, ()))]

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = [inputs[i] for i in self.kept(len(inputs))]
        return sum(inputs[1:], inputs[0]) / len(inputs) if len(inputs) > 1 else inputs[0]


class FractalBlock(nn.Module):
    """f_C of Sec. 2 followed by a 2x2/2 max-pool on every column, as laid out by the authors' generator:
    at depth d (0-based, 2^(C-1) layers), column k (1-based) has a layer when (d + 1) is a multiple of
    2^(C-k), and the columns that have one join after it (the last join after the pools)."""

    def __init__(self, in_channels: int, out_channels: int, num_columns: int, drop_rate: float,
                 drop_path_rate: float, bn_affine: bool = True):
        super().__init__()
        self.num_columns, self.depth = num_columns, 2 ** (num_columns - 1)
        self.columns = nn.ModuleList(
            nn.Sequential(*[ConvUnit(in_channels if i == 0 else out_channels, out_channels, drop_rate, bn_affine)
                            for i in range(2 ** k)])
            for k in range(num_columns))
        # one join after every depth where at least two columns end (depth - 1 joins in all)
        self.joins = nn.ModuleDict({str(d): FractalJoin(drop_path_rate) for d in range(self.depth)
                                    if len(self.columns_at(d)) > 1})
        self.pool = nn.MaxPool2d(2)

    def columns_at(self, d: int) -> list[int]:
        """0-based indices of the columns with a layer at depth d (always the deepest ones)."""
        return [k for k in range(self.num_columns) if (d + 1) % 2 ** (self.num_columns - 1 - k) == 0]

    def forward(self, x: torch.Tensor, column: int | None = None) -> torch.Tensor:
        if column is not None:  # one column alone (global drop-path, or Table 3's evaluation)
            return self.pool(self.columns[column - 1](x))
        outs = [x] * self.num_columns
        for d in range(self.depth):
            ending = self.columns_at(d)
            for k in ending:
                outs[k] = self.columns[k][(d + 1) // 2 ** (self.num_columns - 1 - k) - 1](outs[k])
                if d == self.depth - 1:
                    outs[k] = self.pool(outs[k])
            if str(d) in self.joins:
                joined = self.joins[str(d)]([outs[k] for k in ending])
                for k in ending:
                    outs[k] = joined
        return outs[-1]


class FractalNet(Classifier):
    """FractalNet of Sec. 4: B fractal blocks of C columns, each followed by a 2x2 max-pool, and a linear
    classifier on the flattened last map. The defaults are FractalNet-20 for CIFAR-10.

    Args:
        num_classes: classifier outputs (10 for CIFAR-10).
        in_chans: input image channels.
        num_columns: C, the columns of every block (3: depth 2^(C-1) = 4 per block).
        channels: output channels of each block, which also fixes B (64, 128, 256, 512, 512).
        drop_rates: dropout rate in the layers of each block (Sec. 4: 0, 0.1, 0.2, 0.3, 0.4); one per block.
        drop_path_rate: local drop-path, the probability that a join drops each input (Sec. 4: 0.15).
        global_drop_ratio: the fraction of training mini-batches that use global drop-path (one column for
            the whole network) instead of local (Sec. 4: 0.5). 0 with `drop_path_rate=0` turns drop-path off.
        column: None for the whole fractal, or k in 1..C to run (train or evaluate) column k alone;
            `set_column` changes it later.
        input_size: the native input side (32 for CIFAR), recorded in `default_cfg`.
        init: "caffe" (the authors' Caffe "xavier" filler, U(+-sqrt(3 / fan_in)), biases 0) or "pytorch".
        bn_affine: BN with a learned scale and shift (True, 33,734,922 parameters for FractalNet-20) or
            without, as the authors' Caffe BatchNorm (False, 33,714,314).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, num_columns: int = 3,
                 channels: Sequence[int] = (64, 128, 256, 512, 512),
                 drop_rates: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4), drop_path_rate: float = 0.15,
                 global_drop_ratio: float = 0.5, column: int | None = None, input_size: int = 32,
                 init: Literal["caffe", "pytorch"] = "caffe", bn_affine: bool = True):
        super().__init__()
        if num_columns < 1:
            raise ValueError(f"num_columns must be >= 1, got {num_columns}")
        if len(drop_rates) != len(channels):
            raise ValueError(f"need one dropout rate per block: {len(channels)} blocks (channels={tuple(channels)}) "
                             f"but drop_rates={tuple(drop_rates)}")
        if not (0.0 <= drop_path_rate <= 1.0 and 0.0 <= global_drop_ratio <= 1.0):
            raise ValueError(f"drop_path_rate and global_drop_ratio are probabilities in [0, 1], got "
                             f"{drop_path_rate} and {global_drop_ratio}")
        if init not in ("caffe", "pytorch"):
            raise ValueError(f"init must be 'caffe' or 'pytorch', got {init!r}")
        if input_size % 2 ** len(channels):
            raise ValueError(f"input_size {input_size} must be divisible by 2^{len(channels)} (one 2x2 pool per "
                             f"block)")
        self.num_classes, self.in_chans, self.num_columns = num_classes, in_chans, num_columns
        self.global_drop_ratio = global_drop_ratio  # local drop-path's rate lives on each FractalJoin
        self.column: int | None = None
        self.set_column(column)
        self.blocks = nn.ModuleList()
        c_in = in_chans
        for c_out, p in zip(channels, drop_rates):
            self.blocks.append(FractalBlock(c_in, c_out, num_columns, p, drop_path_rate, bn_affine))
            c_in = c_out
        self.num_features = c_in
        self.head_pool = nn.AdaptiveAvgPool2d(1)  # the identity on CIFAR, where the last map is 512 x 1 x 1
        self.fc = nn.Linear(c_in, num_classes)
        self.default_cfg = make_default_cfg("cifar", num_classes, in_chans, input_size)
        if init == "caffe":
            init_caffe_xavier_(self)

    def set_column(self, column: int | None) -> None:
        """Run column `column` (1..C, Table 3's numbering: column k is 2^(k-1) layers deep per block) alone
        from now on, in training and eval; None restores the whole fractal."""
        if column is not None and not (isinstance(column, int) and 1 <= column <= self.num_columns):
            raise ValueError(f"column must be None or an int in 1..{self.num_columns}, got {column!r}")
        self.column = column

    def sample_global_column(self) -> int | None:
        """The column global drop-path keeps for this mini-batch (1..C), or None for a local drop-path batch."""
        if not self.training or self.global_drop_ratio <= 0.0 or float(torch.rand(())) >= self.global_drop_ratio:
            return None
        return int(torch.randint(1, self.num_columns + 1, ()))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        column = self.column if self.column is not None else self.sample_global_column()
        for block in self.blocks:
            x = block(x, column)
        return x  # N x 512 x 1 x 1 on CIFAR

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.head_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def stage_specs(self) -> list[tuple[str, int, int]]:
        return [(f"blocks.{i}", [m for m in b.modules() if isinstance(m, nn.Conv2d)][-1].out_channels, 2 ** (i + 1))
                for i, b in enumerate(self.blocks)]


@register_model
def fractalnet20(**kwargs) -> FractalNet:
    """FractalNet-20 for CIFAR (Sec. 4): 5 blocks of 3 columns, 64-128-256-512-512 channels, dropout
    0/0.1/0.2/0.3/0.4, local drop-path 0.15, global drop-path on half the batches; 33,734,922 parameters
    with affine BN (ours; the authors' BN without scale and shift, `bn_affine=False`: 33,714,314)."""
    model_args = dict(num_columns=3, channels=(64, 128, 256, 512, 512), drop_rates=(0.0, 0.1, 0.2, 0.3, 0.4),
                      drop_path_rate=0.15, global_drop_ratio=0.5)
    return FractalNet(**dict(model_args, **kwargs))
