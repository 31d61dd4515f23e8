"""Local response normalisation (Krizhevsky et al. 2012, section 3.3) as torch.ops.lightcnn.lrn.

Semantics are exactly those of `torch.nn.functional.local_response_norm`, on every input: NaN and Inf
land where the reference puts them (only in the windows that hold a non-finite value or an overflowing
square), and values from 1e-3 to 1e19 keep the float32 reference's accuracy, because every window sum is
recomputed from its n terms, never carried from channel to channel. The backward saves only the input: the
scale (k + alpha/n * window sum)^-beta is recomputed in the same pass that sums the gradient terms, which is
cheaper than keeping a second activation-sized tensor alive until the backward.

GPU model (PREDICTIONS of benchmarks/gpu_model.py from the CUDA emulator's access record, not measured;
docs/gpu_model.md): a training call is two launches, the forward (read x, write y) and a one-pass backward
(read x and dy, write dx), moving the compulsory traffic (1.00x; about 0.11x the reference's ~45 passes) at
34 or more waves of 132 SMs (AlexNet's 96x55x55 LRN, batch 128). Predicted memory-bound time of that layer
on an H100: 228 us in float32, 117 us in bfloat16, in either layout (F.local_response_norm: 2060 / 1062 us).
Channels-last, a warp per pixel: every access 100% coalesced. Channels-first, a warp reads 32 neighbouring
pixels of a channel row, so its coalescing is that of the rows' alignment: 100% where H*W is a multiple of
8 (GoogLeNet's 56x56), about 80% in float32 and 66% in bfloat16 at AlexNet's odd 55x55 and 27x27 (a
misaligned run of 32 values touches one 32-byte sector more than it fills): below the 80% / 90% targets
there.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from lightcnn.ops import _library, reference


def _auto(cfg: _library.Config) -> bool:
    # CUDA channels-last: the reference, where a GPU measured the kernel slower than compiled and eager;
    # NCHW and every CPU layout: the kernel, measured faster (figures in benchmarks/RESULTS.md).
    return not (cfg.device_type == "cuda" and cfg.channels_last)


OP = _library.register(
    "lrn", helpers=("lrn_backward",),
    dtypes={"cpu": (torch.float32, torch.float64, torch.bfloat16),
            "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)},
    auto=_auto, auto_reason="reference on CUDA channels-last (measured 7x slower than NCHW); kernel elsewhere")


def _check_args(input: torch.Tensor, size: int) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"local_response_norm: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 3:
        raise ValueError(
            f"local_response_norm: input must have at least 3 dimensions (N, C, ...), got shape {tuple(input.shape)}; "
            "add a batch dimension with input.unsqueeze(0)"
        )
    if not input.is_floating_point():
        raise TypeError(
            f"local_response_norm: input must be a floating-point tensor, got {input.dtype}; "
            "convert it with input.float()"
        )
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"local_response_norm: size must be an int >= 1 (the number of channels summed), got {size!r}")


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """Local response normalisation over channels, as `torch.nn.functional.local_response_norm`.

    Autocast policy: none applies. The op computes (accumulating in float32 for half inputs) and returns in
    its input's dtype, with or without `torch.autocast`: a normalisation is cheap next to the convolution
    before it, and returning the dtype it is given keeps a bf16 network in bf16. The reference follows the
    same policy (it runs with autocast off), so "kernel", "reference" and "auto" agree; the composite
    `F.local_response_norm` itself does not (under CUDA autocast its pow runs in float32 and it returns
    float32 on some torch versions).

    Args:
        input: (N, C, *) floating-point tensor (3-D, 4-D or 5-D; contiguous or channels-last).
        size: n, the number of neighbouring channels summed (window [c - n//2, c + (n-1)//2]).
        alpha, beta, k: b_c = a_c / (k + alpha / n * sum a^2)^beta (PyTorch's convention: alpha is
            divided by n; the AlexNet paper's alpha=1e-4 with n=5 is alpha=5e-4 here).
    """
    _check_args(input, size)
    if _library.use_kernel(OP, input):
        return torch.ops.lightcnn.lrn.default(input, size, float(alpha), float(beta), float(k))
    return reference.local_response_norm(input, size, alpha, beta, k)


if OP.defined:

    @torch.library.register_fake("lightcnn::lrn")
    def _lrn_fake(input, size, alpha, beta, k):
        return torch.empty_like(input, memory_format=_library.memory_format(input))

    @torch.library.register_fake("lightcnn::lrn_backward")
    def _lrn_backward_fake(grad_output, input, size, alpha, beta, k):
        return torch.empty_like(input, memory_format=_library.memory_format(input))

    def _lrn_setup_context(ctx, inputs, output):
        input, size, alpha, beta, k = inputs
        ctx.save_for_backward(input)
        ctx.args = (size, alpha, beta, k)

    def _lrn_backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = torch.ops.lightcnn.lrn_backward.default(grad_output, input, *ctx.args)
        return grad_input, None, None, None, None

    torch.library.register_autograd("lightcnn::lrn", _lrn_backward, setup_context=_lrn_setup_context)

    # FlopCounterMode counts matrix products and convolutions only: the reference's pooling, powers and
    # divisions count 0, so LRN counts 0 on either path and a model's total is the same with both.
    @register_flop_formula([torch.ops.lightcnn.lrn, torch.ops.lightcnn.lrn_backward])
    def _lrn_flop(*args, out_shape=None, **kwargs) -> int:
        return 0
