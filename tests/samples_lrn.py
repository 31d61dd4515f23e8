"""The LRN op's sample inputs and their comparison with `torch.nn.functional.local_response_norm`, shared by
every test of the op: tests/test_lrn.py (CPU and GPU kernels), tests/test_cuda_emulated.py (the CUDA
kernels on the emulator) and benchmarks/sanitize_ops.py (compute-sanitizer on a GPU).

Besides O(1) values, the samples hold what broke window sums carried from channel to channel: NaN and
+-Inf, magnitudes from 1e-3 to 1e19 (float32 squares up to 1e38, so that some window sums overflow), a
channel of 1e6 and one of 3e19 among O(1) values, and tiny values whose squares underflow. A kernel must
give NaN and Inf exactly where the reference does, and elsewhere agree with it, or be no further from the
float64 result than the reference itself is (where float32 overflow or rounding makes the reference
inexact).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Per element, for assert_lrn_close against the reference. float32: the kernels compute s^-beta with a
# multiply by the reciprocal power (and, for beta=0.75 on AVX2, a Newton-refined rsqrt, ~5 ulp), PyTorch with
# pow then a division.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    # bfloat16 keeps 8 bits of mantissa: outputs are compared with the float32 reference, to within
    # two bfloat16 rounding steps of the output's magnitude.
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}
SAMPLES = ("normal", "mixed_magnitudes", "large_channels", "tiny", "non_finite")
FINITE_SAMPLES = SAMPLES[:-1]

# (shape, window size) of the CPU kernel's tests: any rank from 3-D
SHAPES_SIZES = [
    ((2, 7, 5, 3), 5),  # AlexNet's n=5
    ((2, 7, 5, 3), 4),  # even window: [c - 2, c + 1]
    ((3, 4, 11), 9),  # 3-D input, window wider than the channel count
    ((2, 6, 3, 2, 4), 2),  # 5-D input
    ((1, 1, 3, 3), 3),  # one channel
    ((2, 13, 1, 1), 1),  # size 1: a plain power of the own square
    ((2, 33, 7, 37), 7),  # odd sizes past the vector width and tile edges
    ((2, 5, 3, 3), 12),  # window much wider than C
]
# 4-D shapes and window sizes of the CUDA code path's tests (tests/test_cuda_emulated.py, each shape with each
# size, and benchmarks/sanitize_ops.py): C = 300, several channels a lane in the channels-last kernels, runs of
# channels in the others; (1, 96, 1, 1): 1 pixel, so 12 runs of 8 channels; sizes 1, 2 (even), 5 and 6
# (wider than some C).
CUDA_SHAPES = ((2, 7, 5, 3), (1, 1, 2, 2), (3, 33, 1, 4), (1, 300, 2, 1), (1, 96, 1, 1), (1, 16, 2, 1))
CUDA_SIZES = (1, 2, 5, 6)
# larger (shape, window size) for the GPU only (benchmarks/sanitize_ops.py), kept off the emulator, which runs
# each thread in turn
GPU_SHAPES_SIZES = (((3, 96, 7, 5), 5), ((2, 300, 3, 3), 4), ((2, 7, 5, 3), 12))


def lrn_sample(kind: str, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """One input of `shape` (N, C, ...): drawn in float64 on the CPU from torch's seeded generator, then cast
    (values beyond a half type's range become +-Inf there, as a network's would)."""
    n = 1
    for s in shape:
        n *= s
    sign = torch.randint(0, 2, shape).double() * 2 - 1
    if kind == "normal":
        x = torch.randn(shape, dtype=torch.float64) * 2
    elif kind == "mixed_magnitudes":  # |x| from 1e-3 to 1e19, log-uniform
        x = sign * 10 ** (torch.rand(shape, dtype=torch.float64) * 22 - 3)
    elif kind == "tiny":  # |x| from 1e-30 to 1e-3: float32 squares underflow
        x = sign * 10 ** (torch.rand(shape, dtype=torch.float64) * 27 - 30)
    elif kind == "large_channels":  # a running sum lost 1.7% after 1e5, 20% after 1e6; 3e19^2 overflows float32
        x = torch.randn(shape, dtype=torch.float64)
        x[:, shape[1] // 3] = 1e6
        x[:, (2 * shape[1]) // 3] = -3e19
    elif kind == "non_finite":  # about one value in eight is NaN, +Inf or -Inf, at least one of each
        x = torch.randn(shape, dtype=torch.float64)
        flat = x.view(-1)
        where = torch.randperm(n)[: max(3, n // 8)]
        for i, value in enumerate((float("nan"), float("inf"), float("-inf"))):
            flat[where[i::3]] = value
    else:
        raise ValueError(f"unknown LRN sample {kind!r}; one of {SAMPLES}")
    return x.to(device=device, dtype=dtype)


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel computes in, and the reference it must match: float32 for the half types."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lrn_references(x: torch.Tensor, size: int, grad: torch.Tensor | None = None, **kw):
    """F.local_response_norm of x in reference_dtype(x.dtype) and in float64: (y, y64), or with `grad`
    (y, y64, dx, dx64), dx the input gradient for the output gradient `grad`."""
    out = []
    for dtype in (reference_dtype(x.dtype), torch.float64):
        xr = x.detach().to(dtype).requires_grad_(grad is not None)
        y = F.local_response_norm(xr, size, **kw)
        if grad is not None:
            y.backward(grad.to(dtype))
        out.append((y.detach(), xr.grad))
    (y, dx), (y64, dx64) = out
    return (y, y64) if grad is None else (y, y64, dx, dx64)


def assert_lrn_close(actual: torch.Tensor, expected: torch.Tensor, exact: torch.Tensor, rtol: float, atol: float,
                     what: str = "") -> None:
    """`actual` (a kernel's result) against `expected` (the reference in the kernel's compute dtype) and
    `exact` (the reference in float64): NaN, +Inf and -Inf at exactly the reference's places; every other
    element within rtol/atol of the reference, or no further from the float64 result than the reference is
    (plus rtol/atol)."""
    assert actual.shape == expected.shape == exact.shape, f"{what}: shapes {actual.shape} {expected.shape}"
    a, e, x64 = actual.double(), expected.double(), exact.double()
    for name, test in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        differ = test(a) != test(e)
        assert not differ.any(), (f"{what}: {name} at {int(differ.sum())} places where the reference has none or "
                                  f"vice versa, e.g. index {differ.nonzero()[0].tolist()}: "
                                  f"{a[differ][:3].tolist()} vs reference {e[differ][:3].tolist()}")
    finite = torch.isfinite(e)
    a, e, x64 = a[finite], e[finite], x64[finite]
    near_reference = (a - e).abs() <= atol + rtol * e.abs()
    no_worse = (a - x64).abs() <= (e - x64).abs() + atol + rtol * x64.abs()
    bad = ~(near_reference | no_worse)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {a.numel()} values off, e.g. {a[bad][:3].tolist()} vs "
                           f"reference {e[bad][:3].tolist()}, float64 {x64[bad][:3].tolist()}")
