"""The LRN kernel (torch.ops.lightcnn.lrn) against torch.nn.functional.local_response_norm."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightcnn.ops as ops
from lightcnn.layers import LocalResponseNorm
from lightcnn.models import create
from tests.conftest import DEVICES, requires_cuda
from tests.samples_lrn import (
    FINITE_SAMPLES,
    SAMPLES,
    SHAPES_SIZES,
    TOL,
    assert_lrn_close,
    lrn_references,
    lrn_sample,
)


def lrn_args(beta=0.75):
    return dict(alpha=0.1, beta=beta, k=2.0)  # alpha large enough that the window sum matters


def check_sample(x, size, what="", grad=None, **kw):
    """The kernel's forward and input gradient on x (a sample of tests/samples_lrn.py) against
    F.local_response_norm in the kernel's compute dtype and in float64 (assert_lrn_close: the same NaN/Inf
    places, values within TOL[x.dtype] or no further from float64 than the reference); returns them."""
    xk = x.detach().clone().requires_grad_(True)  # clone keeps the layout
    yk = ops.local_response_norm(xk, size, **kw)
    g = torch.randn(x.shape, dtype=torch.float64).to(device=x.device, dtype=x.dtype) if grad is None else grad
    yk.backward(g)
    y, y64, dx, dx64 = lrn_references(x, size, g, **kw)
    assert yk.dtype == xk.grad.dtype == x.dtype
    assert_lrn_close(yk, y, y64, **TOL[x.dtype], what=f"forward {what}")
    assert_lrn_close(xk.grad, dx, dx64, **TOL[x.dtype], what=f"input gradient {what}")
    return yk, xk.grad


def test_compiled_library_serves_the_op():
    """No silent fallback: the kernel of torch.ops.lightcnn.lrn is the one that runs."""
    info = ops.backend_info()
    assert info["error"] is None, info["error"]
    assert info["ops"]["lrn"]["cpu"]  # the op and its backward (registered as its helper)
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.local_response_norm(x, 5).sum().backward()
    names = {e.name for e in prof.events()}
    assert "lightcnn::lrn" in names and "lightcnn::lrn_backward" in names


@pytest.mark.skipif(os.environ.get("LIGHTCNN_FORCE_CUDA") != "1", reason="only for builds with LIGHTCNN_FORCE_CUDA=1")
def test_cuda_kernels_are_compiled_in_forced_build():
    ops_info = ops.backend_info()["ops"]
    assert ops_info["lrn"]["cuda"] and ops_info["bn_relu_conv2d"]["cuda"], ops_info


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,size", SHAPES_SIZES)
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_matches_reference(sample, shape, size, dtype, device):
    check_sample(lrn_sample(sample, shape, dtype, device), size, f"{sample} {shape} n={size}", **lrn_args())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.5, 1.0, 0.6, 2.3])
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_matches_reference_any_beta(sample, beta, device):
    for dtype in (torch.float64, torch.float32):  # float32: the reference's own overflow (beta > 1) included
        check_sample(lrn_sample(sample, (2, 9, 5, 6), dtype, device), 3, f"{sample} beta={beta}", **lrn_args(beta))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "transposed", "sliced", "expanded_grad"])
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_non_contiguous_and_channels_last(sample, layout, device):
    if layout == "channels_last":
        x = lrn_sample(sample, (2, 10, 6, 7), device=device).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = lrn_sample(sample, (2, 10, 3, 6, 7), device=device).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = lrn_sample(sample, (2, 7, 6, 10), device=device).transpose(1, 3)
    else:
        x = lrn_sample(sample, (2, 20, 6, 14), device=device)[:, ::2, :, 1::2]
    assert not x.is_contiguous()
    if layout == "expanded_grad":  # a stride-0 gradient, as sum() produces
        g = torch.ones((), device=device).expand(x.shape)
    else:  # a non-contiguous gradient
        g = torch.randn(x.shape, device=device).transpose(-1, -2).contiguous().transpose(-1, -2)
    yk, _ = check_sample(x, 5, f"{sample} {layout}", grad=g, **lrn_args())
    if layout.startswith("channels_last"):  # the layout is kept, so the next conv stays channels-last
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert yk.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_channels_last_every_window_width(sample, size, device):
    """Channels-last rows: shifted adds along the row for every window width, also wider than 2C."""
    for dtype in (torch.float64, torch.float32):
        x = lrn_sample(sample, (2, 24, 3, 5), dtype, device).contiguous(memory_format=torch.channels_last)
        yk, _ = check_sample(x, size, f"{sample} n={size} {dtype}", **lrn_args())
        assert yk.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_bfloat16_against_float32_reference(sample, channels_last, device):
    x = lrn_sample(sample, (2, 16, 9, 11), torch.bfloat16, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check_sample(x, 5, f"{sample} bfloat16", **lrn_args())


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_float16_cuda_against_float32_reference(sample):
    check_sample(lrn_sample(sample, (2, 16, 9, 11), torch.float16, "cuda"), 5, f"{sample} float16", **lrn_args())


def test_lrn_float16_on_cpu_runs_the_reference():
    x = torch.randn(2, 8, 5, 5).half()
    y = ops.local_response_norm(x, 5, **lrn_args())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), F.local_response_norm(x.float(), 5, **lrn_args()), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,size", [((2, 5, 3, 2), 3), ((1, 4, 3), 2), ((1, 3, 2, 2, 2), 5)])
@pytest.mark.parametrize("sample", FINITE_SAMPLES)
def test_lrn_gradcheck(sample, shape, size, device):
    x = lrn_sample(sample, shape, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.local_response_norm(t, size, **lrn_args()), (x,))
    xc = lrn_sample(sample, (2, 5, 3, 2), torch.float64, device).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: ops.local_response_norm(t, 3, **lrn_args()), (xc.requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", FINITE_SAMPLES)  # opcheck compares eager with traced outputs, NaN != NaN
def test_lrn_opcheck(sample, device):
    samples = [
        (lrn_sample(sample, (2, 5, 3, 4), device=device).requires_grad_(), 5),
        (lrn_sample(sample, (2, 6, 3, 4), device=device).contiguous(memory_format=torch.channels_last)
         .requires_grad_(), 4),
        (lrn_sample(sample, (3, 4, 7), device=device).requires_grad_(), 9),
        (lrn_sample(sample, (1, 3, 2, 2, 2), torch.float64, device).requires_grad_(), 2),
        (lrn_sample(sample, (2, 8, 4, 6), device=device)[:, ::2], 3),
    ]
    for x, size in samples:
        torch.library.opcheck(torch.ops.lightcnn.lrn.default, (x, size, 1e-2, 0.75, 2.0))
        g = torch.randn_like(x)
        torch.library.opcheck(torch.ops.lightcnn.lrn_backward.default, (g, x.detach(), size, 1e-2, 0.75, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_lrn_under_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def f(x):
        return ops.local_response_norm(torch.relu(x) * 3, 5, **lrn_args()).sum(dim=1)

    compiled = torch.compile(f, fullgraph=True)
    for sample in SAMPLES:  # one shape: compiled once
        x = lrn_sample(sample, (2, 8, 6, 6), device=device).requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        y = compiled(x)
        yr = F.local_response_norm(torch.relu(xr) * 3, 5, **lrn_args()).sum(dim=1)
        torch.testing.assert_close(y, yr, **TOL[torch.float32], equal_nan=True, msg=sample)
        y.sum().backward()
        yr.sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32], equal_nan=True, msg=sample)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["kernel", "reference", "auto"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_autocast_policy_returns_the_input_dtype(device, impl, channels_last):
    """The documented policy (lightcnn/ops/lrn.py): autocast does not touch LRN; it computes and returns in
    its input's dtype, checked against F.local_response_norm in float32 outside autocast (not against what
    one torch version's autocast does to the composite op)."""
    conv = nn.Conv2d(3, 8, 3).to(device)
    x = torch.randn(2, 3, 9, 9, device=device)
    if channels_last:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    layer = LocalResponseNorm(5, alpha=0.1, k=2.0, impl=impl)
    with torch.autocast(device, dtype=torch.bfloat16):
        h = conv(x)  # bfloat16: conv2d is on autocast's lower-precision list
        y_half = layer(h)
        y_full = layer(h.float())  # a float32 input stays float32
    assert h.dtype == y_half.dtype == torch.bfloat16 and y_full.dtype == torch.float32
    expected = F.local_response_norm(h.float(), 5, alpha=0.1, k=2.0)
    torch.testing.assert_close(y_half.float(), expected, **TOL[torch.bfloat16])
    torch.testing.assert_close(y_full, expected, **TOL[torch.float32])


def test_layer_is_a_drop_in_for_nn_local_response_norm():
    ref = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    ours = LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    assert isinstance(ours, nn.LocalResponseNorm)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, 7, 7) * 10
    torch.testing.assert_close(ours(x), ref(x), **TOL[torch.float32])
    torch.testing.assert_close(LocalResponseNorm(5, 5e-4, 0.75, 2.0, impl="reference")(x), ref(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        LocalResponseNorm(5, impl="cuda")


@pytest.mark.parametrize(
    "x,size,exc,match",
    [
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), 3, TypeError, "floating-point"),
        (torch.ones(2, 3, 4, 4), 0, ValueError, "size must be an int >= 1"),
        (torch.ones(2, 3, 4, 4), 2.5, ValueError, "size must be an int >= 1"),
        (torch.ones(3, 4), 3, ValueError, "at least 3 dimensions"),
        ([1.0, 2.0], 3, TypeError, "must be a torch.Tensor"),
    ],
)
def test_lrn_bad_input_gives_clear_error(x, size, exc, match):
    with pytest.raises(exc, match=match):
        ops.local_response_norm(x, size)


def test_lrn_op_checks_its_inputs():
    """The compiled op itself refuses bad input with a message naming the problem (no crash)."""
    with pytest.raises(RuntimeError, match="at least 3 dimensions"):
        torch.ops.lightcnn.lrn(torch.ones(3, 4), 3, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.lightcnn.lrn(torch.ones(2, 3, 4, dtype=torch.int32), 3, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="size must be >= 1"):
        torch.ops.lightcnn.lrn(torch.ones(2, 3, 4), 0, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="CPU kernel takes float32, float64 or bfloat16"):
        torch.ops.lightcnn.lrn(torch.ones(2, 3, 4, dtype=torch.float16), 3, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="grad_output has shape"):
        torch.ops.lightcnn.lrn_backward(torch.ones(2, 3, 5), torch.ones(2, 3, 4), 3, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="grad_output has dtype"):
        torch.ops.lightcnn.lrn_backward(torch.ones(2, 3, 4).double(), torch.ones(2, 3, 4), 3, 1e-4, 0.75, 1.0)


@requires_cuda
@pytest.mark.cuda
def test_lrn_mixed_devices_error():
    with pytest.raises(RuntimeError, match="grad_output is on"):
        torch.ops.lightcnn.lrn_backward(torch.ones(2, 3, 4), torch.ones(2, 3, 4, device="cuda"), 3, 1e-4, 0.75, 1.0)


def test_lrn_empty_input():
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    y = ops.local_response_norm(x, 3)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


_FALLBACK_SNIPPET = """
import sys, warnings
sys.modules["lightcnn._C"] = None  # as if the library had not been built
import torch, torch.nn.functional as F
import lightcnn.ops as ops
x = torch.randn(2, 6, 4, 4)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    y = ops.local_response_norm(x, 5)
    ops.local_response_norm(x, 5)
print("warnings:", sum("falling back" in str(m.message) for m in w))
print("equal:", torch.equal(y, F.local_response_norm(x, 5)))
print("info:", ops.backend_info()["error"] is not None)
"""


def _run_snippet(env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", _FALLBACK_SNIPPET], capture_output=True, text=True, env=env,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_missing_library_falls_back_with_one_warning():
    r = _run_snippet({"LIGHTCNN_REQUIRE_KERNELS": "0"})
    assert r.returncode == 0, r.stderr
    assert "warnings: 1" in r.stdout and "equal: True" in r.stdout and "info: True" in r.stdout, r.stdout


def test_missing_library_is_an_error_when_kernels_are_required():
    r = _run_snippet({"LIGHTCNN_REQUIRE_KERNELS": "1"})
    assert r.returncode != 0
    assert "LIGHTCNN_REQUIRE_KERNELS=1 forbids falling back" in r.stderr


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,size", [((3, 96, 7, 5), 5), ((2, 300, 3, 3), 4), ((2, 7, 5, 3), 12), ((2, 1, 4, 4), 3)])
@pytest.mark.parametrize("variant", ["warp", "column"])
@pytest.mark.parametrize("sample", SAMPLES)
def test_lrn_cuda_channels_last_kernels_match_reference(monkeypatch, sample, dtype, shape, size, variant):
    """Both CUDA designs on channels-last inputs: the default, a warp per pixel, and the per-column kernels
    (LIGHTCNN_CUDA_LRN_CHANNELS_LAST=column): forward and input gradient as F.local_response_norm in
    float32/64, including more channels than a warp (300), an even window and a window wider than C."""
    if variant == "column":
        monkeypatch.setenv("LIGHTCNN_CUDA_LRN_CHANNELS_LAST", "column")
    x = lrn_sample(sample, shape, dtype, "cuda").contiguous(memory_format=torch.channels_last)
    check_sample(x, size, f"{sample} {variant}", **lrn_args())


def test_lrn_non_finite_stays_in_its_windows():
    """An Inf in channel 2 of a pixel makes NaN of its own output and 0 of its window's neighbours, as the
    reference: the later channels keep their values (a running sum over the channels made them all NaN)."""
    x = torch.ones(1, 12, 1, 1)
    x[0, 2] = float("inf")
    y = torch.ops.lightcnn.lrn(x, 3, 1e-4, 0.75, 1.0).flatten()
    ref = F.local_response_norm(x, 3, 1e-4, 0.75, 1.0).flatten()
    assert y.isnan().tolist() == ref.isnan().tolist() == [c == 2 for c in range(12)]
    assert y[[1, 3]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(y[~y.isnan()], ref[~ref.isnan()], rtol=1e-6, atol=0)


@pytest.mark.parametrize("magnitude", [1e5, 1e6, 1e15])
def test_lrn_exact_after_a_large_channel(magnitude):
    """O(1) channels after one large one keep float32 accuracy (a running sum lost 1.7% after 1e5, 20% after
    1e6: the large square subtracted again cancels the small ones)."""
    x = torch.rand(3, 32, 4, 4) + 0.5
    x[:, 5] = magnitude
    want = F.local_response_norm(x.double(), 5, 1e-2, 0.75, 1.0)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = ops.local_response_norm(x.contiguous(memory_format=layout), 5, 1e-2, 0.75, 1.0)
        assert ((y.double() - want).abs() / want.abs()).max().item() < 1e-5


def test_alexnet_eval_on_huge_input_gives_the_reference_logits():
    """AlexNet (LRN after conv1 and conv2) on an input scaled by 1e8: finite logits, those of the reference
    LRN (the running-sum kernel gave NaN)."""
    kernel = create("alexnet", num_classes=10, hidden_features=64, impl="kernel").eval()
    reference = create("alexnet", num_classes=10, hidden_features=64, impl="reference").eval()
    reference.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 3, 227, 227) * 1e8
    with torch.no_grad():
        y, want = kernel(x), reference(x)
    assert torch.isfinite(want).all() and torch.isfinite(y).all()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
