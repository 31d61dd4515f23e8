"""nn.Module face of the memory-efficient DenseNet op (lightcnn.ops.dense_bn_relu_conv2d)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightcnn.layers._impl import LAYER_OPS, Impl, runs_kernel
from lightcnn.layers.bn_relu_conv import BNReLUConv2d
from lightcnn.ops import dense, dense_bn_relu_conv2d


class DenseConv2d(BNReLUConv2d):
    """BatchNorm2d -> ReLU -> Conv2d (stride 1, no bias) over the concatenation of a list of feature maps:
    a DenseNet layer's bottleneck 1x1 (or, without bottleneck, its 3x3) and a transition's 1x1.

    `forward(features)` takes the list [x_0, ..., x_{l-1}] and computes `conv(relu(bn(torch.cat(features, 1))))`.
    With the kernel the concatenation is never stored and the BN-ReLU output is recomputed in the backward
    from the saved batch statistics, so that a dense block's activation memory grows linearly with its
    depth; `impl="reference"` runs exactly that unfused sequence. The state_dict is that of
    `nn.Sequential(bn=BatchNorm2d, relu=ReLU, conv=Conv2d)` and the running statistics evolve exactly as
    in nn.BatchNorm2d. A BN swapped for another class (e.g. SyncBatchNorm) runs the unfused sequence.

    Args:
        in_channels: channels of the concatenation (the sum over the list).
        out_channels: the convolution's output channels.
        kernel_size: 1 (bottleneck, transition) or 3 with padding 1 (a DenseNet layer without bottleneck).
        padding: the convolution's zero padding.
        eps, momentum: as `nn.BatchNorm2d`.
        impl: "auto", "kernel", "reference", or None to follow `lightcnn.layers.set_default_impl`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0,
                 eps: float = 1e-5, momentum: float | None = 0.1, impl: Impl | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding, bias=False, eps=eps,
                         momentum=momentum, impl=impl)

    def forward(self, features: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(features, torch.Tensor):
            features = [features]
        if not runs_kernel(self.impl, dense.OP, features[0]) or type(self.bn) is not nn.BatchNorm2d:
            return self.conv(self.relu(self.bn(torch.cat(list(features), 1))))
        rm, rv, training, momentum = self._bn_args()
        return dense_bn_relu_conv2d(features, rm, rv, self.bn.weight, self.bn.bias, self.conv.weight,
                                    self.conv.padding, training, momentum, self.bn.eps)


LAYER_OPS["DenseConv2d"] = dense.OP
