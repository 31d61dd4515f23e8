"""Fused pre-activation BN -> ReLU -> Conv2d (He et al. 2016, "Identity mappings in deep residual networks",
section 4.1) as torch.ops.lightcnn.bn_relu_conv2d.

Stock PyTorch keeps two activation-sized tensors per unit for the backward: the BN input and the ReLU
output (which is also the conv input). The fused op keeps only the input and the per-channel mean and
variance, and recomputes relu(bn(x)) in the backward (the InPlace-ABN idea, Rota Bulo et al. 2018,
without the in-place part): about half the activation memory of a pre-activation network.

The op is functional (it returns the batch mean and variance instead of updating the running
statistics, so that it can carry an autograd formula); `bn_relu_conv2d` below updates them afterwards
exactly as `nn.BatchNorm2d` does. The recomputation in the backward uses the saved batch statistics
and never touches the running ones (the checkpointed-DenseNet bug).

Dropout (the Wide ResNet unit BN -> ReLU -> Dropout -> Conv, Zagoruyko & Komodakis 2016, Sec. 2.4) sits
inside the op: the keep mask is drawn once in Python (`reference.dropout_mask`, torch's generator, so
seeding and the RNG state of checkpoints work as for `F.dropout`), passed to the op, and kept for the
backward as a bool tensor: 1 byte per element against the 4 (float32) of the dropout output and the 4 of
the ReLU output the unfused sequence keeps. We chose a stored mask over regenerating it from a
counter-based seed in the backward: the two would cost about the same memory traffic, the stored mask
needs no RNG of our own on two devices, and a test can hand the same mask to the reference. Packing it
to 1 bit would save a further 7/8 of a byte per element at the price of a packing kernel per device.

GPU model (PREDICTIONS of benchmarks/gpu_model.py from the CUDA emulator's access record, not measured;
docs/gpu_model.md; the figures are in benchmarks/RESULTS.md, "GPU model (predictions)"): a training call
(forward + backward) is 8 launches, each reduction finishing in one launch that also does the per-channel
step; it moves close to the compulsory 10 activation-sized passes, below the unfused reference's 13; every
access to the activations is coalesced in NCHW and in channels-last (in channels-last bfloat16 the loads
of the per-channel parameters, which L1 keeps, use half of each sector for some channel counts); every
launch moving more than 1 MB at the real layers' shapes runs several waves of an H100's 132 SMs; and its
predicted memory-bound time on an H100 is below the reference's for the real layers, except the smallest
(PreAct-164's 16x32x32 and 256x8x8 units in bfloat16), which are launch-bound: 8 launches against the
reference's 6.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.flop_counter import (
    conv_backward_flop,
    conv_flop_count,
    register_flop_formula,
)

from lightcnn.ops import _library, reference


def _auto(cfg: _library.Config) -> bool:
    # CUDA: the kernel only where a GPU measured it no slower than the unfused reference (the WRN-28-10 step
    # in benchmarks/RESULTS.md): float32 with TF32 off and float64, NCHW. With a faster convolution (half
    # precision, TF32) or channels-last the per-channel passes dominate and the kernel measured slower, so
    # the reference is the default there until `benchmarks/gpu_check.sh` times the current kernels.
    # CPU: the kernel (same time, half the memory).
    if cfg.device_type != "cuda":
        return True
    return cfg.compute_dtype in (torch.float32, torch.float64) and not cfg.tf32 and not cfg.channels_last


# dtypes: of the input (the BN part); under autocast the convolution runs in the autocast dtype.
OP = _library.register(
    "bn_relu_conv2d", helpers=("bn_relu_conv2d_backward",),
    dtypes={"cpu": (torch.float32, torch.float64),
            "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)},
    autocast=True, auto=_auto,
    auto_reason="CUDA: kernel only in float32 with TF32 off and float64, NCHW (measured slower "
    "with bf16 autocast + channels-last 2.34x and TF32 1.27x); CPU: kernel")


def _pair(name: str, v: int | Sequence[int]) -> list[int]:
    if isinstance(v, str):
        raise ValueError(f"bn_relu_conv2d: {name}={v!r} is not supported; give the {name} as an int or a pair of ints")
    vals = [v, v] if isinstance(v, int) else list(v)
    if len(vals) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in vals):
        raise ValueError(f"bn_relu_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return vals


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_args(input, running_mean, running_var, weight, bias, conv_weight, conv_bias, training, momentum, eps):
    if not isinstance(input, torch.Tensor) or not isinstance(conv_weight, torch.Tensor):
        raise TypeError("bn_relu_conv2d: input and conv_weight must be torch.Tensors")
    if input.dim() != 4:
        raise ValueError(
            f"bn_relu_conv2d: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}"
            + ("; add a batch dimension with input.unsqueeze(0)" if input.dim() == 3 else "")
        )
    if not input.is_floating_point():
        raise TypeError(
            f"bn_relu_conv2d: input must be floating point, got {input.dtype}; convert it with input.float()")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != C):
            raise ValueError(
                f"bn_relu_conv2d: {name} must have shape ({C},), one value per input channel, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bn_relu_conv2d: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("bn_relu_conv2d: eval mode (training=False) needs running_mean and running_var")
    if conv_weight.dim() != 4:
        raise ValueError("bn_relu_conv2d: conv_weight must be 4-D (C_out, C_in / groups, kH, kW), "
                         f"got shape {tuple(conv_weight.shape)}")
    if conv_bias is not None and tuple(conv_bias.shape) != (conv_weight.shape[0],):
        raise ValueError(
            f"bn_relu_conv2d: conv_bias must have shape ({conv_weight.shape[0]},), got {tuple(conv_bias.shape)}")
    if training and input.numel() // max(C, 1) <= 1:
        raise ValueError(
            "bn_relu_conv2d: expected more than 1 value per channel when training, "
            f"got input of shape {tuple(input.shape)}"
        )
    if not eps > 0:
        raise ValueError(f"bn_relu_conv2d: eps must be > 0, got {eps}")
    if training and running_mean is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bn_relu_conv2d: momentum must be in [0, 1], got {momentum}")


def bn_relu_conv2d(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5, drop_rate: float = 0.0,
                   drop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv2d(F.dropout(F.relu(F.batch_norm(input, ...))), conv_weight, ...)` with half the saved activations.

    The arguments are those of `F.batch_norm` followed by those of `F.conv2d`, with the same semantics:
    in training the batch statistics normalise and, when given, `running_mean`/`running_var` are updated
    in place (momentum, unbiased variance) as `F.batch_norm` does; in eval the running statistics are used.
    Autocast policy: under `torch.autocast` the BN-ReLU(-dropout) computes in the input's dtype (statistics
    in float32 for half inputs) and the convolution in the autocast dtype (the weights are cast, float64
    ones excepted), which is also the output's dtype: what autocast does to the unfused sequence, where
    batch_norm runs in its input's dtype and conv2d is on the lower-precision list. Gradients return in
    the dtypes of the input and parameters.

    Args:
        input: (N, C, H, W), contiguous or channels-last (other strides are copied to contiguous).
        running_mean, running_var: (C,) or None (then training must be True).
        weight, bias: BN affine parameters (C,), or None for gamma=1, beta=0.
        conv_weight, conv_bias: (C_out, C / groups, kH, kW) and (C_out,) or None.
        stride, padding, dilation, groups: as `F.conv2d` (ints or pairs; no string padding).
        training: batch statistics (True) or running statistics (False).
        momentum: running = (1 - momentum) * running + momentum * batch statistic.
        eps: added to the variance.
        drop_rate: dropout probability p between the ReLU and the conv, applied in training only
            (kept values are scaled by 1 / (1 - p), as `F.dropout`); 0 for none.
        drop_mask: the keep mask (bool, the input's shape) to use instead of a fresh
            `reference.dropout_mask(input, drop_rate)`; for tests and for sharing a mask.
    """
    _check_args(input, running_mean, running_var, weight, bias, conv_weight, conv_bias, training, momentum, eps)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"bn_relu_conv2d: drop_rate must be in [0, 1), got {drop_rate}")
    dropping = training and drop_rate > 0
    if dropping and drop_mask is not None and (drop_mask.dtype != torch.bool or drop_mask.shape != input.shape):
        raise ValueError(f"bn_relu_conv2d: drop_mask must be a bool tensor of the input's shape {tuple(input.shape)}, "
                         f"got {drop_mask.dtype} {tuple(drop_mask.shape)}")
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    dev = input.device
    if not _library.use_kernel(OP, input):
        return reference.bn_relu_conv2d(input, running_mean, running_var, weight, bias, conv_weight, conv_bias,
                                        stride, padding, dilation, groups, training, momentum, eps, drop_rate,
                                        drop_mask)
    if dropping and drop_mask is None:
        drop_mask = reference.dropout_mask(input, drop_rate)
    cw, cb = conv_weight, conv_bias
    if torch.is_autocast_enabled(dev.type) and cw.dtype != torch.float64:
        # autocast casts conv2d's (non-double) floating arguments to its dtype; BN and ReLU it leaves alone.
        cast = torch.get_autocast_dtype(dev.type)
        cw, cb = cw.to(cast), (None if cb is None else cb.to(cast))
    with torch.autocast(dev.type, enabled=False):
        out, mean, var = torch.ops.lightcnn.bn_relu_conv2d.default(
            input, weight, bias, None if training else running_mean, None if training else running_var,
            cw, cb, stride, padding, dilation, groups, training, float(eps), drop_mask if dropping else None,
            float(drop_rate) if dropping else 0.0)
    if training and running_mean is not None:
        reference.update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[1],
                                       momentum)
    return out


if OP.defined:

    def _fake_y(input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(input.shape, dtype=dtype, device=input.device, memory_format=_library.memory_format(input))

    @torch.library.register_fake("lightcnn::bn_relu_conv2d")
    def _bn_relu_conv2d_fake(input, weight, bias, running_mean, running_var, conv_weight, conv_bias, stride,
                             padding, dilation, groups, training, eps, drop_mask=None, drop_rate=0.0):
        out = torch.ops.aten.convolution.default(_fake_y(input, conv_weight.dtype), conv_weight, conv_bias, stride,
                                                 padding, dilation, False, [0, 0], groups)
        sdt = _stats_dtype(input.dtype)
        C = input.shape[1]
        return out, input.new_empty((C,), dtype=sdt), input.new_empty((C,), dtype=sdt)

    @torch.library.register_fake("lightcnn::bn_relu_conv2d_backward")
    def _bn_relu_conv2d_backward_fake(grad_output, input, weight, bias, mean, var, conv_weight, stride, padding,
                                      dilation, groups, training, eps, has_conv_bias, drop_mask=None,
                                      drop_rate=0.0):
        _, grad_w, grad_b = torch.ops.aten.convolution_backward.default(
            grad_output.to(conv_weight.dtype), _fake_y(input, conv_weight.dtype), conv_weight,
            [conv_weight.shape[0]] if has_conv_bias else None, stride, padding, dilation, False, [0, 0], groups,
            [False, True, has_conv_bias])
        if not has_conv_bias:
            grad_b = conv_weight.new_empty((0,))
        sdt = _stats_dtype(input.dtype)
        C = input.shape[1]
        return (_fake_y(input, input.dtype), input.new_empty((C,), dtype=sdt), input.new_empty((C,), dtype=sdt),
                grad_w, grad_b)

    def _setup_context(ctx, inputs, output):
        (input, weight, bias, _, _, conv_weight, conv_bias, stride, padding, dilation, groups, training, eps,
         drop_mask, drop_rate) = inputs
        _, mean, var = output
        # Only the input, the 1-byte dropout mask and per-channel tensors: the BN-ReLU(-dropout) output is
        # recomputed in the backward.
        ctx.save_for_backward(input, weight, bias, mean, var, conv_weight, drop_mask)
        ctx.mark_non_differentiable(mean, var)
        ctx.args = (stride, padding, dilation, groups, training, eps)
        ctx.drop_rate = drop_rate
        ctx.has_conv_bias = conv_bias is not None
        ctx.conv_bias_dtype = None if conv_bias is None else conv_bias.dtype

    def _backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, bias, mean, var, conv_weight, drop_mask = ctx.saved_tensors
        gi, gw, gb, gcw, gcb = torch.ops.lightcnn.bn_relu_conv2d_backward.default(
            grad_output, input, weight, bias, mean, var, conv_weight, *ctx.args, ctx.has_conv_bias, drop_mask,
            ctx.drop_rate)
        gw = None if weight is None else gw.to(weight.dtype)
        gb = None if bias is None else gb.to(bias.dtype)
        gcb = gcb.to(ctx.conv_bias_dtype) if ctx.has_conv_bias else None
        return gi, gw, gb, None, None, gcw, gcb, None, None, None, None, None, None, None, None

    torch.library.register_autograd("lightcnn::bn_relu_conv2d", _backward, setup_context=_setup_context)

    # FLOPs as FlopCounterMode counts the unfused reference: the convolution's (BN, ReLU and dropout count
    # nothing there), forward; in the backward, the convolution's input and weight gradients (the bias
    # gradient is a sum, which convolution_backward's formula counts as nothing too).
    @register_flop_formula(torch.ops.lightcnn.bn_relu_conv2d)
    def _bn_relu_conv2d_flop(input, weight, bias, running_mean, running_var, conv_weight, *args, out_shape=None,
                             **kwargs) -> int:
        return conv_flop_count(input, conv_weight, out_shape[0], transposed=False)

    @register_flop_formula(torch.ops.lightcnn.bn_relu_conv2d_backward)
    def _bn_relu_conv2d_backward_flop(grad_output, input, weight, bias, mean, var, conv_weight, stride, padding,
                                      dilation, groups, training, eps, has_conv_bias, *args, out_shape=None,
                                      **kwargs) -> int:
        # conv_backward_flop is registered wrapped: it takes (shapes of) the outputs as out_val
        return conv_backward_flop(grad_output, input, conv_weight, None, stride, padding, dilation, False, [0, 0],
                                  groups, [True, True, False], out_val=[out_shape[0], out_shape[3]])
