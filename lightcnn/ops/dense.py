"""BN -> ReLU -> Conv2d over the concatenation of a list of feature maps, without the concatenation, as
torch.ops.lightcnn.dense_bn_relu_conv2d: the memory-efficient DenseNet layer (Huang et al. 2017; the
shared-storage idea of Pleiss et al. 2017, "Memory-efficient implementation of DenseNets").

Why: layer l of a dense block reads cat(x_0, ..., x_{l-1}). Run as `conv(relu(bn(cat(...))))`, autograd
keeps, per layer, the new concatenation (for BN's backward) and the BN-ReLU output (for the conv's
backward): two tensors as wide as everything before the layer, so a block's activation memory grows with
the square of its depth. torchvision's `memory_efficient=True` checkpoints the concatenation, BN, ReLU and
conv, and so runs all four twice.

Design (the op and its backward, C++ in csrc/dense.{h,cpp} and csrc/cuda/dense_cuda.cu):
- The input is the list of features itself (`Tensor[]`): the concatenation is never materialised or
  saved. The block keeps its feature maps in a Python list, as it must anyway for the layers that follow;
  every layer's op saves references to those same tensors (one storage each, whatever the number of
  readers), so a block's saved memory is the sum of its features: linear in depth.
- Forward: the batch statistics of each feature (ATen's batch-norm statistics, the same code
  nn.BatchNorm2d runs), then relu(x * scale + shift) written straight from every feature into its channel
  slice of one temporary buffer (this replaces the concatenation's copy: one read of each feature, one
  write), the convolution (oneDNN / cuDNN) on that buffer, and the buffer is freed. Only the per-channel
  mean and variance are kept beside the inputs.
- Backward: the buffer is recomputed from the features and the *saved* batch statistics (the running
  statistics are never updated twice: the long-standing bug of checkpointed DenseNets), the
  convolution's backward gives the gradient of the buffer, the buffer is freed, and a BN-ReLU backward
  (per-channel sums, then the elementwise gradient) reads each feature and its slice of that gradient and
  writes the feature's own gradient tensor. The ReLU mask is recomputed in the same rounding as the forward.
- The op is functional (it returns the batch mean and biased variance; `dense_bn_relu_conv2d` below updates
  the running statistics exactly as nn.BatchNorm2d: momentum, unbiased variance), so it carries a
  register_autograd formula and works under torch.compile.
- The per-channel arithmetic and the argument checks are those of the fused pre-activation op
  (csrc/bn_relu_conv.h); the 3x3 BN-ReLU-Conv of a DenseNet-BC layer is that op
  (`lightcnn.layers.BNReLUConv2d`), which keeps only its 4k-channel input. So a dense layer keeps little
  more than its bottleneck output and its own k new channels.

Autocast: as `bn_relu_conv2d` (and the unfused sequence): the convolution runs in the autocast dtype, the
BN-ReLU in the features' dtype; the output has the convolution's dtype.

GPU model (PREDICTIONS of benchmarks/gpu_model.py from the CUDA emulator's access record, not measured;
docs/gpu_model.md): at DenseNet-121's block 1, layer 6 (batch 64) a training call moves 1.04-1.05x (fp32) and
1.10-1.11x (bf16) the compulsory 10 passes over the concatenation's size, 0.69-0.74x the reference's 15 (cat, BN,
ReLU and their backward), in 8 launches (the statistics' finishing launch does the affine step). Channels-last,
every global access of the activation kernels is 100% coalesced (a warp reads neighbouring channels of a pixel and
each thread sums one channel over many pixels); channels-first, the reductions' loads are 54-60% coalesced at that
layer and 30% at the worst (the gradient is loaded only where the ReLU passes, about half the lanes: the same
sectors, half the useful bytes), the rest 100% (benchmarks/RESULTS.md). Every launch moving > 1 MB has at least
5.6 waves of 132 SMs (the channels-last reductions of block 4, whose grid the host sizes for 8 blocks an SM; the
others 62 or more). Predicted memory-bound time of that layer on an H100: about 590 us fp32 (reference 826),
322-324 us bf16 (424). The batch statistics shift their sums by K, the mean of a channel's first values, so that
the variance's float rounding stays that of the variance itself. On CUDA, impl="auto" takes the reference until a
GPU measures the kernel (see `_auto`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from lightcnn.ops import _library, reference


def _auto(cfg: _library.Config) -> bool:
    # A kernel is the default only where it was measured no slower than the reference. CPU: measured
    # (0.96x the unfused step time, 0.58x the peak memory of torchvision's checkpointed DenseNet). CUDA:
    # never timed on a GPU, so the reference (cat -> BN -> ReLU -> conv) until gpu_check.sh measures it.
    return cfg.device_type != "cuda"


# dtypes: of the features (the BN part); under autocast the convolution runs in the autocast dtype.
OP = _library.register(
    "dense_bn_relu_conv2d", helpers=("dense_bn_relu_conv2d_backward",),
    dtypes={"cpu": (torch.float32, torch.float64),
            "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)},
    autocast=True, auto=_auto,
    auto_reason="CPU: kernel (measured: 0.96x the unfused step time, 0.58x the peak memory of checkpointing); "
    "CUDA: reference, the kernel was never timed on a GPU against it (impl=\"kernel\" selects it)")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _common_format(features: Sequence[torch.Tensor]) -> torch.memory_format:
    """The layout of the kernels' buffer and feature gradients; mirrors common_format() in csrc/dense.h."""
    for f in features:
        if f.is_contiguous() or not f.is_contiguous(memory_format=torch.channels_last):
            return torch.contiguous_format
    return torch.channels_last


def _pair(v: int | Sequence[int]) -> list[int]:
    vals = [v, v] if isinstance(v, int) and not isinstance(v, bool) else list(v)
    if len(vals) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vals):
        raise ValueError(f"dense_bn_relu_conv2d: padding must be an int >= 0 or a pair of them, got {v!r}")
    return vals


def _check_args(features, running_mean, running_var, weight, bias, conv_weight, training, momentum, eps):
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)) or not features:
        raise TypeError("dense_bn_relu_conv2d: features must be a non-empty list of (N, C_i, H, W) tensors "
                        "(the block's feature maps, concatenated along dim 1); wrap a single tensor as [x]")
    f0 = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            raise ValueError(f"dense_bn_relu_conv2d: features[{i}] must be a 4-D (N, C_i, H, W) tensor, got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"dense_bn_relu_conv2d: features[{i}] must be floating point, got {f.dtype}")
        if (f.shape[0], f.shape[2], f.shape[3]) != (f0.shape[0], f0.shape[2], f0.shape[3]):
            raise ValueError(f"dense_bn_relu_conv2d: features[{i}] has shape {tuple(f.shape)} but features[0] has "
                             f"{tuple(f0.shape)}; N, H and W must agree (they are concatenated along dim 1)")
        if f.dtype != f0.dtype or f.device != f0.device:
            raise ValueError(f"dense_bn_relu_conv2d: features[{i}] is {f.dtype} on {f.device} but features[0] is "
                             f"{f0.dtype} on {f0.device}; every feature must share them")
    C = sum(f.shape[1] for f in features)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != C):
            raise ValueError(f"dense_bn_relu_conv2d: {name} must have shape ({C},), one value per channel of the "
                             f"concatenation, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("dense_bn_relu_conv2d: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("dense_bn_relu_conv2d: eval mode (training=False) needs running_mean and running_var")
    if conv_weight.dim() != 4 or conv_weight.shape[1] != C:
        raise ValueError(f"dense_bn_relu_conv2d: conv_weight must be (C_out, {C}, kH, kW) (groups=1 over the "
                         f"{C} concatenated channels), got {tuple(conv_weight.shape)}")
    if training and f0.shape[0] * f0.shape[2] * f0.shape[3] <= 1:
        raise ValueError("dense_bn_relu_conv2d: expected more than 1 value per channel when training, got "
                         f"features of shape {tuple(f0.shape)}")
    if not eps > 0:
        raise ValueError(f"dense_bn_relu_conv2d: eps must be > 0, got {eps}")
    if training and running_mean is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"dense_bn_relu_conv2d: momentum must be in [0, 1], got {momentum}")


def dense_bn_relu_conv2d(features: Sequence[torch.Tensor], running_mean: torch.Tensor | None,
                         running_var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         conv_weight: torch.Tensor, padding: int | Sequence[int] = 0, training: bool = False,
                         momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """`F.conv2d(F.relu(F.batch_norm(torch.cat(features, 1), ...)), conv_weight, padding=padding)` without the
    concatenation and without keeping the BN-ReLU output (see the module docstring for the design).

    Args:
        features: the (N, C_i, H, W) feature maps to concatenate along dim 1, same dtype, device, N, H, W;
            contiguous or channels-last (all channels-last: the buffer is channels-last too).
        running_mean, running_var: (C,) with C = sum of C_i, or None (then training must be True); updated in
            place in training (momentum, unbiased variance), as `F.batch_norm` does.
        weight, bias: BN affine parameters (C,), or None for gamma=1, beta=0.
        conv_weight: (C_out, C, kH, kW); the convolution has stride 1, dilation 1, groups 1 and no bias.
        padding: the convolution's zero padding (int or pair).
        training: batch statistics (True) or running statistics (False).
        momentum, eps: as `F.batch_norm`.
    """
    _check_args(features, running_mean, running_var, weight, bias, conv_weight, training, momentum, eps)
    padding = _pair(padding)
    features = list(features)
    dev = features[0].device
    if not _library.use_kernel(OP, features[0]):
        return reference.dense_bn_relu_conv2d(features, running_mean, running_var, weight, bias, conv_weight,
                                              padding, training, momentum, eps)
    cw = conv_weight
    if torch.is_autocast_enabled(dev.type) and cw.dtype != torch.float64:
        cw = cw.to(torch.get_autocast_dtype(dev.type))  # autocast casts conv2d's arguments, not BN's
    with torch.autocast(dev.type, enabled=False):
        out, mean, var = torch.ops.lightcnn.dense_bn_relu_conv2d.default(
            features, weight, bias, None if training else running_mean, None if training else running_var, cw,
            padding, training, float(eps))
    if training and running_mean is not None:
        reference.update_running_stats(running_mean, running_var, mean, var,
                                       features[0].numel() // features[0].shape[1], momentum)
    return out


def _concat_shape(feature_shapes) -> list[int]:
    s = list(feature_shapes[0])
    s[1] = sum(f[1] for f in feature_shapes)
    return s


if OP.defined:

    def _fake_stats(f0, C):
        sdt = _stats_dtype(f0.dtype)
        return f0.new_empty((C,), dtype=sdt), f0.new_empty((C,), dtype=sdt)

    def _fake_y(features, dtype):
        shape = _concat_shape([f.shape for f in features])
        return torch.empty(shape, dtype=dtype, device=features[0].device, memory_format=_common_format(features))

    @torch.library.register_fake("lightcnn::dense_bn_relu_conv2d")
    def _dense_fake(features, weight, bias, running_mean, running_var, conv_weight, padding, training, eps):
        out = torch.ops.aten.convolution.default(_fake_y(features, conv_weight.dtype), conv_weight, None, [1, 1],
                                                 padding, [1, 1], False, [0, 0], 1)
        return (out, *_fake_stats(features[0], conv_weight.shape[1]))

    @torch.library.register_fake("lightcnn::dense_bn_relu_conv2d_backward")
    def _dense_backward_fake(grad_output, features, weight, bias, mean, var, conv_weight, padding, training, eps):
        _, grad_w, _ = torch.ops.aten.convolution_backward.default(
            grad_output.to(conv_weight.dtype), _fake_y(features, conv_weight.dtype), conv_weight, None, [1, 1],
            padding, [1, 1], False, [0, 0], 1, [False, True, False])
        fmt = _common_format(features)
        grads = [torch.empty(f.shape, dtype=f.dtype, device=f.device, memory_format=fmt) for f in features]
        return (grads, *_fake_stats(features[0], conv_weight.shape[1]), grad_w)

    def _setup_context(ctx, inputs, output):
        features, weight, bias, _, _, conv_weight, padding, training, eps = inputs
        _, mean, var = output
        # The features themselves (kept alive by the block anyway) and per-channel tensors; no concatenation.
        ctx.save_for_backward(weight, bias, mean, var, conv_weight, *features)
        ctx.mark_non_differentiable(mean, var)
        ctx.args = (padding, training, eps)

    def _backward(ctx, grad_output, _grad_mean, _grad_var):
        weight, bias, mean, var, conv_weight, *features = ctx.saved_tensors
        grads, gw, gb, gcw = torch.ops.lightcnn.dense_bn_relu_conv2d_backward.default(
            grad_output, features, weight, bias, mean, var, conv_weight, *ctx.args)
        gw = None if weight is None else gw.to(weight.dtype)
        gb = None if bias is None else gb.to(bias.dtype)
        return list(grads), gw, gb, None, None, gcw, None, None, None

    torch.library.register_autograd("lightcnn::dense_bn_relu_conv2d", _backward, setup_context=_setup_context)

    # FLOPs: the convolution's, as FlopCounterMode counts the unfused sequence (BN and ReLU count nothing);
    # the backward op counts the convolution's backward (grad of input and of weight), as aten's does.
    @register_flop_formula(torch.ops.lightcnn.dense_bn_relu_conv2d)
    def _dense_flop(features, weight, bias, running_mean, running_var, conv_weight, padding, *args, out_shape,
                    **kwargs) -> int:
        return conv_flop_count(_concat_shape(features), list(conv_weight), list(out_shape[0]))

    @register_flop_formula(torch.ops.lightcnn.dense_bn_relu_conv2d_backward)
    def _dense_backward_flop(grad_output, features, weight, bias, mean, var, conv_weight, *args, out_shape=None,
                             **kwargs) -> int:
        x_shape = _concat_shape(features)
        return 2 * conv_flop_count(x_shape, list(conv_weight), list(grad_output))

