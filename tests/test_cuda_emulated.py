"""The CUDA kernels, executed on the CPU by the emulator in tests/cuda_emu (CI has no GPU).

`torch.ops.lightcnn_emu.<op>` is the CUDA code path of `torch.ops.lightcnn.<op>` (its host logic, launch
configurations and kernels, thread by thread with real barriers and warp shuffles) compiled for the CPU;
see tests/cuda_emu/cuda_emu.h for what the emulator checks. Each op is compared with the CPU kernel in
float32/float64 and with a float64 reference for float16/bfloat16, in both layouts and on odd shapes, with
every opt-in CUDA variant. What the emulator cannot show is speed, and races between threads of different
blocks (they run one after another): those need the GPU (benchmarks/gpu_check.sh).
"""
import json

import pytest
import torch

import lightcnn.ops  # noqa: F401  (loads torch.ops.lightcnn.*)
from tests._lrn_samples import SAMPLES, assert_lrn_close, lrn_references, lrn_sample
from tests._lrn_samples import TOL as LRN_TOL
from tests.cuda_emu.build import build

HALF = [torch.float16, torch.bfloat16]
# max |emulated - reference| / max(max |reference|, 1), per dtype (the inputs are O(1), so a per-channel sum
# that cancels to ~0 still carries rounding of O(1) terms): a wrong index or a lost partial sum is O(1)
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    build(tmp_path_factory.mktemp("cuda_emu"))
    return torch.ops.lightcnn_emu


def assert_close(actual, expected, dtype, what=""):
    assert actual.shape == expected.shape, what
    actual, expected = actual.double(), expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual - expected).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def layout(x, kind):
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


# ---------------------------------------------------------------- the emulator itself


def test_emulator_runs_a_correct_block_reduction(emu):
    x = torch.randn(1000)
    assert emu.emu_selftest(x, 0)[0].item() == pytest.approx(x.sum().item(), rel=1e-5, abs=1e-4)


def test_emulator_exposes_a_missing_barrier(emu):
    x = torch.arange(64, dtype=torch.float32)
    y = emu.emu_selftest(x, 1)
    # a thread read its neighbour's shared slot before the neighbour wrote it: poison (NaN) or a wrong value
    assert not torch.equal(y, x.roll(-1))


@pytest.mark.parametrize("case, match", [
    (2, "deadlock: lanes wait at a warp shuffle"),
    (3, "names lanes that do not exist in a block of 48 threads"),
    (4, "1 to 1024 threads per block"),
])
def test_emulator_reports_misuse(emu, case, match):
    with pytest.raises(RuntimeError, match=match):
        emu.emu_selftest(torch.zeros(64), case)


# ---------------------------------------------------------------- LRN

LRN = dict(alpha=0.3, beta=0.75, k=2.0)  # a large alpha, so that every channel of the window matters
# C = 300: several channels a lane in the channels-last kernels, runs of channels in the others;
# (1, 96, 1, 1): 1 pixel, so 12 runs of 8 channels
LRN_SHAPES = [(2, 7, 5, 3), (1, 1, 2, 2), (3, 33, 1, 4), (1, 300, 2, 1), (1, 96, 1, 1), (1, 16, 2, 1)]


def check_lrn(emu, x, size, what, beta=LRN["beta"]):
    """The emulated forward and input gradient against F.local_response_norm (tests/_lrn_samples.py: the same
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
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
def test_lrn_forward_and_backward(emu, monkeypatch, variant, kind, dtype):
    """Every sample of the op (O(1), 1e-3..1e19, large channels, tiny, NaN/Inf), every shape, window widths 1,
    2 (even), 5 and 6."""
    if variant == "column":  # the per-column kernels on channels-last inputs too
        monkeypatch.setenv("LIGHTCNN_CUDA_LRN_CHANNELS_LAST", "column")
    for shape in LRN_SHAPES:
        for size in (1, 2, 5, 6):
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


def _bn_relu_conv_args(dtype, kind, training, shape=(2, 6, 5, 4), groups=1, stride=(1, 1), drop=False,
                       affine=True):
    N, C, H, W = shape
    pdt = torch.float32 if dtype in HALF else dtype  # half activations with float32 BN parameters (AMP)
    x = layout(torch.randn(shape, dtype=torch.float64).to(dtype), kind)
    mask = torch.rand(shape) > 0.3 if drop else None
    w, b = (torch.rand(C, dtype=pdt) + 0.5, torch.randn(C, dtype=pdt)) if affine else (None, None)
    return [x, w, b, torch.randn(C, dtype=pdt),
            torch.rand(C, dtype=pdt) + 0.5, torch.randn(4, C // groups, 3, 3, dtype=torch.float64).to(dtype),
            torch.randn(4, dtype=torch.float64).to(dtype), list(stride), [1, 1], [1, 1], groups, training, 1e-5,
            mask, 0.3 if drop else 0.0]


def _as_double(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _run_bn_relu_conv(op_ns, args):
    out, mean, var = op_ns.bn_relu_conv2d(*args)
    g = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    grads = op_ns.bn_relu_conv2d_backward(g, args[0], args[1], args[2], mean, var, args[5], *args[7:13], True,
                                          args[13], args[14])
    return (out, mean, var, *grads), g


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
def test_bn_relu_conv_forward_and_backward(emu, kind, dtype):
    check_bn_relu_conv(emu, kind, dtype)


def check_bn_relu_conv(emu, kind, dtype):
    configs = [dict(training=True), dict(training=False), dict(training=True, groups=2, stride=(2, 1)),
               dict(training=True, drop=True), dict(training=True, shape=(3, 37, 1, 3)),
               dict(training=True, shape=(2, 3, 64, 64)),  # several blocks per channel in the reductions
               # 16-byte vectors in the elementwise passes: channels-last (C % 8 == 0), NCHW (H*W % 8 == 0),
               # with the dropout too
               dict(training=True, shape=(2, 16, 3, 5)), dict(training=True, shape=(2, 5, 4, 4), drop=True),
               dict(training=True, shape=(2, 16, 4, 4), drop=True),
               dict(training=True, affine=False), dict(training=False, affine=False)]  # BN without weight/bias
    for cfg in configs:
        args = _bn_relu_conv_args(dtype, kind, **cfg)
        got, g = _run_bn_relu_conv(emu, args)
        ref_args = _as_double(args) if dtype in HALF else args
        out, mean, var = torch.ops.lightcnn.bn_relu_conv2d(*ref_args)
        grads = torch.ops.lightcnn.bn_relu_conv2d_backward(
            g.to(out.dtype), ref_args[0], ref_args[1], ref_args[2], mean, var, ref_args[5], *ref_args[7:13], True,
            ref_args[13], ref_args[14])
        names = ["out", "mean", "var", "grad_input", "grad_weight", "grad_bias", "grad_conv_weight", "grad_conv_bias"]
        for name, a, b in zip(names, got, (out, mean, var, *grads)):
            assert_close(a, b, dtype, f"{name} {cfg}")
        assert got[0].dtype == dtype and got[3].dtype == dtype


# ---------------------------------------------------------------- DenseNet's concatenation op


def _dense_args(dtype, kinds, channels, shape=(2, 5, 4), training=True, kernel_size=1):
    N, H, W = shape
    pdt = torch.float32 if dtype in HALF else dtype
    feats = [layout(torch.randn(N, c, H, W, dtype=torch.float64).to(dtype), kind) for c, kind in zip(channels, kinds)]
    C = sum(channels)
    return [feats, torch.rand(C, dtype=pdt) + 0.5, torch.randn(C, dtype=pdt), torch.randn(C, dtype=pdt),
            torch.rand(C, dtype=pdt) + 0.5, torch.randn(3, C, kernel_size, kernel_size, dtype=torch.float64).to(dtype),
            [kernel_size // 2] * 2, training, 1e-5]


def _run_dense(op_ns, args, g):
    out, mean, var = op_ns.dense_bn_relu_conv2d(*args)
    grads, gw, gb, gcw = op_ns.dense_bn_relu_conv2d_backward(g.to(out.dtype), args[0], args[1], args[2], mean, var,
                                                             *args[5:])
    return [out, mean, var, *grads, gw, gb, gcw]


DENSE_CASES = {
    "three features": dict(channels=[4, 2, 3]),
    "3x3 eval": dict(channels=[4, 2, 3], training=False, kernel_size=3),
    "one feature": dict(channels=[5]),
    "split reduction": dict(channels=[2, 1, 3], shape=(2, 64, 64)),  # N*H*W = 8192: two blocks per channel
    "70 features": dict(channels=[1] * 35 + [2] * 35, shape=(2, 2, 3)),  # two launches of at most 64
    "many images": dict(channels=[3, 2], shape=(16, 5, 4)),  # a thread's values span several images
}


@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
@pytest.mark.parametrize("case", list(DENSE_CASES))
def test_dense_forward_and_backward(emu, case, kind, dtype):
    if dtype != torch.float64 and case in ("70 features", "split reduction") and kind == "mixed":
        pytest.skip("one dtype is enough for the big cases in mixed layouts")
    check_dense(emu, case, kind, dtype)


def check_dense(emu, case, kind, dtype):
    cfg = dict(DENSE_CASES[case])
    n = len(cfg["channels"])
    kinds = {"mixed": ["channels_last", "strided", "contiguous"] * n}.get(kind, [kind] * n)
    args = _dense_args(dtype, kinds, **cfg)
    N, H, W = cfg.get("shape", (2, 5, 4))
    g = torch.randn(N, 3, H, W, dtype=torch.float64)
    got = _run_dense(emu, args, g)
    ref_args = [[f.double() for f in args[0]], *_as_double(args[1:])] if dtype in HALF else args
    expected = _run_dense(torch.ops.lightcnn, ref_args, g)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, dtype, f"result {i} of {case}")


# ---------------------------------------------------------------- the 64-bit index paths


@pytest.mark.parametrize("kind", ["contiguous", "channels_last"])
def test_64_bit_index_paths(emu, monkeypatch, kind):
    """The elementwise kernels index with 32 bits and FastDiv below 2^31 elements, with int64_t above;
    LIGHTCNN_TEST_INDEX64 (honoured by the emulator's build only) sends these small tensors down the
    64-bit path."""
    monkeypatch.setenv("LIGHTCNN_TEST_INDEX64", "1")
    check_bn_relu_conv(emu, kind, torch.float64)
    for case in ("three features", "3x3 eval"):
        check_dense(emu, case, kind, torch.float64)


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
