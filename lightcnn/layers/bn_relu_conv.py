"""nn.Module face of the fused pre-activation BN-ReLU-Conv kernel (lightcnn.ops.bn_relu_conv2d)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lightcnn.layers._impl import LAYER_OPS, Impl, resolve_impl, runs_kernel
from lightcnn.ops import bn_relu_conv, bn_relu_conv2d, reference


class BNReLUConv2d(nn.Sequential):
    """BatchNorm2d -> ReLU -> Conv2d, the pre-activation unit of He et al. 2016, on the fused kernel.

    It is an `nn.Sequential(OrderedDict(bn=..., relu=..., conv=...))`, so its state_dict is that of the
    unfused reference sequence and `impl="reference"` runs exactly that sequence. With the kernel the
    backward keeps only the input and per-channel statistics (about half the activation memory);
    `bn.running_mean`/`running_var`/`num_batches_tracked` evolve exactly as in `nn.BatchNorm2d`.
    If `bn` is swapped for another class (e.g. `nn.SyncBatchNorm.convert_sync_batchnorm`), the layer runs
    the unfused sequence so that the replacement's forward (cross-process statistics) is honoured.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as `nn.Conv2d`
            (integer padding only); `bias` is the conv's (the BN always has its affine parameters).
        eps, momentum: as `nn.BatchNorm2d` (momentum=None: cumulative moving average).
        drop_rate: dropout probability between the ReLU and the conv (BN-ReLU-Dropout-Conv, the Wide ResNet
            unit of Zagoruyko & Komodakis 2016, Sec. 2.4); active in training mode only. The shortcut of
            `forward(x, shortcut)` sees the BN-ReLU output without dropout.
        impl: "auto", "kernel", "reference", or None to follow `lightcnn.layers.set_default_impl`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0, dilation: int = 1, groups: int = 1, bias: bool = False,
                 eps: float = 1e-5, momentum: float | None = 0.1, drop_rate: float = 0.0, impl: Impl | None = None):
        if isinstance(padding, str):
            raise ValueError(f"BNReLUConv2d: padding must be an int or a pair of ints, got {padding!r}")
        super().__init__(OrderedDict(
            bn=nn.BatchNorm2d(in_channels, eps=eps, momentum=momentum),
            relu=nn.ReLU(),
            conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias),
        ))
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"BNReLUConv2d: drop_rate must be in [0, 1), got {drop_rate}")
        self.drop_rate = drop_rate
        self.impl = None if impl is None else resolve_impl(impl)

    def _bn_args(self, update_running_stats: bool = True):
        """(running_mean, running_var, training, momentum) exactly as `_BatchNorm.forward` derives them."""
        bn = self.bn
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and bn.num_batches_tracked is not None and update_running_stats:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        training = self.training or (bn.running_mean is None and bn.running_var is None)
        use_running = (not self.training or bn.track_running_stats) and (update_running_stats or not training)
        return (bn.running_mean if use_running else None, bn.running_var if use_running else None, training, momentum)

    def _fused(self, x: torch.Tensor, conv: nn.Conv2d, update_running_stats: bool = True,
               drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("BNReLUConv2d: the fused kernel supports only integer zero padding")
        rm, rv, training, momentum = self._bn_args(update_running_stats)
        return bn_relu_conv2d(x, rm, rv, self.bn.weight, self.bn.bias, conv.weight, conv.bias, conv.stride,
                              conv.padding, conv.dilation, conv.groups, training, momentum, self.bn.eps,
                              self.drop_rate if drop_mask is not None else 0.0, drop_mask)

    def forward(self, x: torch.Tensor, shortcut: nn.Conv2d | None = None):
        """conv(relu(bn(x))); with `shortcut`, also shortcut(relu(bn(x))) (the projection shortcut that shares
        the pre-activation in He et al. 2016 and Zagoruyko & Komodakis 2016), returned as a pair. The shared
        BN-ReLU is then recomputed for the shortcut, from the same batch statistics, without updating the
        running statistics twice."""
        # A BN replaced by another class (SyncBatchNorm from convert_sync_batchnorm / Lightning's
        # sync_batchnorm) must keep its own forward: the kernel would silently skip its cross-process sync.
        # Dropout (training only): one mask drawn here for either implementation, so that a seed gives the
        # kernel and the reference the same mask.
        mask = reference.dropout_mask(x, self.drop_rate) if self.training and self.drop_rate > 0 else None
        if not runs_kernel(self.impl, bn_relu_conv.OP, x) or type(self.bn) is not nn.BatchNorm2d:
            y = self.relu(self.bn(x))
            out = self.conv(y if mask is None else reference.dropout_with_mask(y, mask, self.drop_rate))
            return out if shortcut is None else (out, shortcut(y))
        out = self._fused(x, self.conv, drop_mask=mask)
        return out if shortcut is None else (out, self._fused(x, shortcut, update_running_stats=False))

    def extra_repr(self) -> str:
        extra = [f"drop_rate={self.drop_rate}"] if self.drop_rate else []
        return ", ".join(extra + ([f"impl={self.impl}"] if self.impl else []))


LAYER_OPS["BNReLUConv2d"] = bn_relu_conv.OP
