"""The CUDA kernels, executed on the CPU by the emulator in tests/cuda_emu (CI has no GPU).

`torch.ops.lightcnn_emu.<op>` is the CUDA code path of `torch.ops.lightcnn.<op>` (its host logic, launch
configurations and kernels, thread by thread with real barriers and warp shuffles) compiled for the CPU;
see tests/cuda_emu/README.md for what the emulator checks (its own tests: tests/test_cuda_emu.py). Each op's
samples (tests/samples_<op>.py) are compared with the CPU kernel in float32/float64 and with a float64
reference for float16/bfloat16, in every layout, with every opt-in CUDA variant. What the emulator cannot
show is speed, and races between threads of different blocks (they run one after another): those need the
GPU (benchmarks/gpu_check.sh).
"""
import json

import pytest
import torch

import lightcnn.ops  # noqa: F401  (loads torch.ops.lightcnn.*)
from tests import samples_bn_relu_conv, samples_dense
from tests.cuda_emu.build import build
from tests.samples_bn_relu_conv import DTYPES, HALF, LAYOUTS, layout
from tests.samples_lrn import CUDA_SHAPES, CUDA_SIZES, SAMPLES, assert_lrn_close, lrn_references, lrn_sample
from tests.samples_lrn import TOL as LRN_TOL

# max |emulated - reference| / max(max |reference|, 1), per dtype (the inputs are O(1), so a per-channel sum
# that cancels to ~0 still carries rounding of O(1) terms): a wrong index or a lost partial sum is O(1)
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def emu():
    build()  # cached between runs (tests/cuda_emu/build.py)
    return torch.ops.lightcnn_emu


def assert_close(actual, expected, dtype, what=""):
    if actual is None or expected is None or expected.numel() == 0:  # a gradient the sample has none of
        assert (actual is None or actual.numel() == 0) and (expected is None or expected.numel() == 0), what
        return
    assert actual.shape == expected.shape, what
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


# ---------------------------------------------------------------- LRN

LRN = dict(alpha=0.3, beta=0.75, k=2.0)  # a large alpha, so that every channel of the window matters


def check_lrn(emu, x, size, what, beta=LRN["beta"]):
    """The emulated forward and input gradient against F.local_response_norm (tests/samples_lrn.py: the same
    NaN/Inf places; values as the reference in the kernel's compute dtype, or no further from float64)."""
    kw = dict(LRN, beta=beta)
    args = (size, kw["alpha"], kw["beta"], kw["k"])
    g = torch.randn(x.shape, dtype=torch.float64).to(x.dtype)
    y_ref, y64, dx_ref, dx64 = lrn_references(x, size, g, **kw)
    y = emu.lrn(x, *args)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert y.dtype == x.dtype and y.is_contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format), what
    assert_lrn_close(y, y_ref, y64, **LRN_TOL[x.dtype], what=f"forward {what}")
    assert_lrn_close(emu.lrn_backward(g, x, *args), dx_ref, dx64, **LRN_TOL[x.dtype], what=f"backward {what}")


@pytest.mark.parametrize("variant", ["default", "column"])
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lrn_forward_and_backward(emu, monkeypatch, variant, kind, dtype):
    """Every sample of the op (O(1), 1e-3..1e19, large channels, tiny, NaN/Inf), every shape, window widths 1,
    2 (even), 5 and 6."""
    if variant == "column":  # the per-column kernels on channels-last inputs too
        monkeypatch.setenv("LIGHTCNN_CUDA_LRN_CHANNELS_LAST", "column")
    for shape in CUDA_SHAPES:
        for size in CUDA_SIZES:
            for sample in SAMPLES:
                check_lrn(emu, layout(lrn_sample(sample, shape, dtype), kind), size, f"{sample} {shape} size {size}")


def test_lrn_every_beta_path(emu):
    """The three special-cased powers and the general one; beta > 1 also where the reference's gradient is NaN
    from overflow."""
    for beta in (0.5, 0.75, 1.0, 0.6, 2.3):
        for dtype in (torch.float64, torch.float32):
            for sample in SAMPLES:
                check_lrn(emu, lrn_sample(sample, (2, 9, 3, 3), dtype), 5, f"{sample} beta {beta} {dtype}", beta)



def _backward_kernels(emu, x, size):
    emu.emu_profile_begin(False)  # the launches only
    try:
        emu.lrn_backward(torch.ones_like(x), x, size, 1e-4, 0.75, 2.0)
    finally:
        rec = json.loads(emu.emu_profile_end())
    return [launch["name"] for launch in rec]


def test_lrn_window_too_wide_for_the_one_pass_backward(emu):
    """Channels-first, the backward runs in one pass while its two rings of n values a thread fit in shared
    memory; a wider window (n = 30: 60 KiB of float32) takes the two-kernel backward, with the same results."""
    x = torch.randn(2, 40, 3, 3)
    assert _backward_kernels(emu, x, 24) == ["lrn_backward_kernel"]
    assert _backward_kernels(emu, x, 30) == ["lrn_backward_t_kernel", "lrn_backward_grad_kernel"]
    for dtype in (torch.float64, torch.float32):
        for sample in SAMPLES:
            check_lrn(emu, lrn_sample(sample, (2, 40, 3, 3), dtype), 30, f"{sample} size 30 {dtype}")

# ---------------------------------------------------------------- fused BN-ReLU-Conv


def check_bn_relu_conv(emu, sample, kind, dtype):
    """The emulated forward and backward of a sample (tests/samples_bn_relu_conv.py) against the CPU kernel (in
    float64 for the half types)."""
    args = sample.make(dtype, kind)
    out, mean, var = emu.bn_relu_conv2d(*args.op())
    g = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    got = (out, mean, var, *emu.bn_relu_conv2d_backward(*args.backward(g, mean, var)))
    ref = args.double() if dtype in HALF else args
    r_out, r_mean, r_var = torch.ops.lightcnn.bn_relu_conv2d(*ref.op())
    expected = (r_out, r_mean, r_var,
                *torch.ops.lightcnn.bn_relu_conv2d_backward(*ref.backward(g.to(r_out.dtype), r_mean, r_var)))
    names = ["out", "mean", "var", "grad_input", "grad_weight", "grad_bias", "grad_conv_weight", "grad_conv_bias"]
    for name, a, b in zip(names, got, expected, strict=True):
        assert_close(a, b, dtype, f"{name} of {sample} ({kind})")
    assert got[0].dtype == dtype and got[3].dtype == dtype


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_relu_conv_forward_and_backward(emu, kind, dtype):
    """Every sample of the op, in every layout and dtype."""
    for sample in samples_bn_relu_conv.SAMPLES.values():
        check_bn_relu_conv(emu, sample, kind, dtype)


# ---------------------------------------------------------------- DenseNet's concatenation op


def check_dense(emu, sample, kind, dtype):
    """The emulated forward and backward of a sample (tests/samples_dense.py) against the CPU kernel (in float64
    for the half types)."""
    args = sample.make(dtype, kind)
    out, mean, var = emu.dense_bn_relu_conv2d(*args.op())
    g = torch.randn(out.shape, dtype=torch.float64)
    grads, gw, gb, gcw = emu.dense_bn_relu_conv2d_backward(*args.backward(g.to(out.dtype), mean, var))
    ref = args.double() if dtype in HALF else args
    r_out, r_mean, r_var = torch.ops.lightcnn.dense_bn_relu_conv2d(*ref.op())
    r_grads, r_gw, r_gb, r_gcw = torch.ops.lightcnn.dense_bn_relu_conv2d_backward(
        *ref.backward(g.to(r_out.dtype), r_mean, r_var))
    got, expected = [out, mean, var, *grads, gw, gb, gcw], [r_out, r_mean, r_var, *r_grads, r_gw, r_gb, r_gcw]
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_close(a, b, dtype, f"result {i} of {sample} ({kind})")


# one dtype is enough for the big samples in mixed layouts
_BIG = ("70_features", "split_reduction")


def _dense_cases():
    """Every sample, layout and dtype; the big samples' host paths (two launches of at most 64 features, several
    blocks a channel) do not depend on the dtype, so in the fast suite they run in float64 and the other dtypes
    are slow (the dtype paths of the kernels run on every other sample)."""
    for case in samples_dense.SAMPLES:
        for dtype in DTYPES:
            marks = [pytest.mark.slow] if case in _BIG and dtype != torch.float64 else []
            yield pytest.param(case, dtype, marks=marks, id=f"{case}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("kind", samples_dense.KINDS)
@pytest.mark.parametrize("case, dtype", list(_dense_cases()))
def test_dense_forward_and_backward(emu, case, kind, dtype):
    if dtype != torch.float64 and case in _BIG and kind == "mixed":
        pytest.skip("one dtype is enough for the big samples in mixed layouts")
    check_dense(emu, samples_dense.SAMPLES[case], kind, dtype)


# ---------------------------------------------------------------- the 64-bit index paths


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_64_bit_index_paths(emu, monkeypatch, kind):
    """The elementwise kernels index with 32 bits and FastDiv below 2^31 elements, with int64_t above;
    LIGHTCNN_TEST_INDEX64 (honoured by the emulator's stand-in for indexing.cuh, tests/cuda_emu/index64.h)
    sends these small tensors down the 64-bit path."""
    monkeypatch.setenv("LIGHTCNN_TEST_INDEX64", "1")
    for sample in samples_bn_relu_conv.SAMPLES.values():
        check_bn_relu_conv(emu, sample, kind, torch.float64)
    for case in ("three_features", "3x3_eval"):
        check_dense(emu, samples_dense.SAMPLES[case], kind, torch.float64)


# ---------------------------------------------------------------- batch statistics far from zero


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_batch_statistics_of_values_far_from_zero(emu, kind):
    """Both ops' CUDA statistics are shifted sums (x - K, K a value of the channel), so a float32 channel of
    mean 1000 and variance ~1 keeps its variance (E[x^2] - E[x]^2 in float32 would lose it entirely)."""
    x = layout(1000 + torch.randn(4, 3, 32, 32, dtype=torch.float64), kind)
    want_mean, want_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    x32 = x.float()
    cw = torch.randn(2, 3, 1, 1)
    _, mean, var = emu.bn_relu_conv2d(x32, None, None, None, None, cw, None, [1, 1], [0, 0], [1, 1], 1, True, 1e-5,
                                      None, 0.0)
    _, dmean, dvar = emu.dense_bn_relu_conv2d([x32[:, :2], x32[:, 2:]], None, None, None, None, cw, [0, 0], True,
                                              1e-5)
    for m, v in ((mean, var), (dmean, dvar)):
        assert (m.double() - want_mean).abs().max().item() < 1e-4
        assert ((v.double() - want_var).abs() / want_var).max().item() < 1e-4
