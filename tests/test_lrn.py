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
from tests.conftest import DEVICES, requires_cuda

# float32 tolerances: the kernel computes s^-beta with a multiply by the reciprocal power (and, for
# beta=0.75 on AVX2, a Newton-refined rsqrt, ~5 ulp), PyTorch with pow then a division.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    # bfloat16 keeps 8 bits of mantissa: outputs are compared with the float32 reference, to within
    # two bfloat16 rounding steps of the output's magnitude.
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}

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


def lrn_args(beta=0.75):
    return dict(alpha=0.1, beta=beta, k=2.0)  # alpha large enough that the window sum matters


def compare(x, size, dtype_ref=None, **kw):
    """Forward and input gradient of the kernel and the reference on the same input and output grad."""
    xk = x.detach().clone().requires_grad_(True)
    xr = x.detach().clone().to(dtype_ref or x.dtype).requires_grad_(True)
    yk = ops.local_response_norm(xk, size, **kw)
    yr = F.local_response_norm(xr, size, **kw)
    g = torch.randn_like(yr)
    yk.backward(g.to(yk.dtype))
    yr.backward(g)
    return yk, yr, xk.grad, xr.grad


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
def test_lrn_matches_reference(shape, size, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 2
    yk, yr, gk, gr = compare(x, size, **lrn_args())
    torch.testing.assert_close(yk, yr, **TOL[dtype])
    torch.testing.assert_close(gk, gr, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.5, 1.0, 0.6, 2.3])
def test_lrn_matches_reference_any_beta(beta, device):
    x = torch.randn(2, 9, 5, 6, device=device, dtype=torch.float64)
    yk, yr, gk, gr = compare(x, 3, **lrn_args(beta))
    torch.testing.assert_close(yk, yr, **TOL[torch.float64])
    torch.testing.assert_close(gk, gr, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "transposed", "sliced", "expanded_grad"])
def test_lrn_non_contiguous_and_channels_last(layout, device):
    if layout == "channels_last":
        x = torch.randn(2, 10, 6, 7, device=device).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = torch.randn(2, 10, 3, 6, 7, device=device).contiguous(memory_format=torch.channels_last_3d)
    elif layout == "transposed":
        x = torch.randn(2, 7, 6, 10, device=device).transpose(1, 3)
    else:
        x = torch.randn(2, 20, 6, 14, device=device)[:, ::2, :, 1::2]
    assert not x.is_contiguous()
    xk = x.detach().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    yk, yr = ops.local_response_norm(xk, 5, **lrn_args()), F.local_response_norm(xr, 5, **lrn_args())
    torch.testing.assert_close(yk, yr, **TOL[torch.float32])
    if layout.startswith("channels_last"):  # the layout is kept, so the next conv stays channels-last
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert yk.is_contiguous(memory_format=fmt)
    if layout == "expanded_grad":  # a stride-0 gradient, as sum() produces
        yk.sum().backward()
        yr.sum().backward()
    else:
        g = torch.randn_like(yr).transpose(-1, -2).contiguous().transpose(-1, -2)  # non-contiguous grad
        yk.backward(g)
        yr.backward(g)
    torch.testing.assert_close(xk.grad, xr.grad, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [1, 2, 5, 16, 17, 40])
def test_lrn_channels_last_every_window_width(size, device):
    """Channels-last rows use shifted adds up to 16 channels and a running sum beyond: both match."""
    x = torch.randn(2, 24, 3, 5, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    yk, yr, gk, gr = compare(x, size, **lrn_args())
    assert yk.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yk, yr, **TOL[torch.float64])
    torch.testing.assert_close(gk, gr, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_lrn_bfloat16_against_float32_reference(channels_last, device):
    x = torch.randn(2, 16, 9, 11, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    yk, yr, gk, gr = compare(x.bfloat16(), 5, dtype_ref=torch.float32, **lrn_args())
    assert yk.dtype == torch.bfloat16 and gk.dtype == torch.bfloat16
    torch.testing.assert_close(yk.float(), yr, **TOL[torch.bfloat16])
    torch.testing.assert_close(gk.float(), gr, **TOL[torch.bfloat16])


@requires_cuda
@pytest.mark.cuda
def test_lrn_float16_cuda_against_float32_reference():
    x = torch.randn(2, 16, 9, 11, device="cuda")
    yk, yr, gk, gr = compare(x.half(), 5, dtype_ref=torch.float32, **lrn_args())
    assert yk.dtype == torch.float16
    torch.testing.assert_close(yk.float(), yr, **TOL[torch.float16])
    torch.testing.assert_close(gk.float(), gr, **TOL[torch.float16])


def test_lrn_float16_on_cpu_runs_the_reference():
    x = torch.randn(2, 8, 5, 5).half()
    y = ops.local_response_norm(x, 5, **lrn_args())
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), F.local_response_norm(x.float(), 5, **lrn_args()), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,size", [((2, 5, 3, 2), 3), ((1, 4, 3), 2), ((1, 3, 2, 2, 2), 5)])
def test_lrn_gradcheck(shape, size, device):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.local_response_norm(t, size, **lrn_args()), (x,))
    xc = torch.randn(2, 5, 3, 2, dtype=torch.float64, device=device).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: ops.local_response_norm(t, 3, **lrn_args()), (xc.requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
def test_lrn_opcheck(device):
    samples = [
        (torch.randn(2, 5, 3, 4, device=device, requires_grad=True), 5),
        (torch.randn(2, 6, 3, 4, device=device).contiguous(memory_format=torch.channels_last).requires_grad_(), 4),
        (torch.randn(3, 4, 7, device=device, requires_grad=True), 9),
        (torch.randn(1, 3, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True), 2),
        (torch.randn(2, 8, 4, 6, device=device)[:, ::2], 3),
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
    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = compiled(x)
    yr = F.local_response_norm(torch.relu(xr) * 3, 5, **lrn_args()).sum(dim=1)
    torch.testing.assert_close(y, yr, **TOL[torch.float32])
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL[torch.float32])


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
def test_lrn_cuda_channels_last_kernels_match_reference(monkeypatch, dtype, shape, size, variant):
    """Both CUDA designs on channels-last inputs (issue 10 item 2): the default, a warp per pixel, and the
    per-column kernels (LIGHTCNN_CUDA_LRN_CHANNELS_LAST=column): forward and input gradient as
    F.local_response_norm in float32/64, including more channels than a warp (300), an even window and a
    window wider than C."""
    if variant == "column":
        monkeypatch.setenv("LIGHTCNN_CUDA_LRN_CHANNELS_LAST", "column")
    x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last).to(dtype)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    yk, yr, gk, gr = compare(x, size, dtype_ref=ref_dtype, **lrn_args())
    torch.testing.assert_close(yk.to(ref_dtype), yr, **TOL[dtype])
    torch.testing.assert_close(gk.to(ref_dtype), gr, **TOL[dtype])
