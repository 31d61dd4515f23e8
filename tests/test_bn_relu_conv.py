"""The fused pre-activation op (torch.ops.lightcnn.bn_relu_conv2d) and BNReLUConv2d against the unfused
reference sequence nn.Sequential(BatchNorm2d, ReLU, Conv2d): outputs, every gradient, running statistics,
eval mode, gradcheck, opcheck, torch.compile, autocast, saved memory, and errors on bad input.
CUDA twins run on a GPU and skip without one."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightcnn import ops
from lightcnn.layers import BNReLUConv2d, LocalResponseNorm, get_default_impl
from lightcnn.ops import _library, bn_relu_conv, lrn
from lightcnn.ops._library import Config
from tests.conftest import DEVICES, requires_cuda

pytestmark = pytest.mark.skipif(not _library.op_defined("bn_relu_conv2d"),
                                reason="lightcnn._C without bn_relu_conv2d (build it first)")

@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 precision in cuDNN convolutions: with TF32 the kernel's and the reference's conv inputs,
    equal to a few float32 ulps, could round to different TF32 values (2^-11 apart)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# (atol, rtol) for outputs and gradients. float32: the kernel sums in a different order than ATen (and in
# double on the CPU), so agreement is to a few float32 ulps of the largest terms.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-4),
       torch.float16: (2e-2, 2e-2), torch.bfloat16: (1e-1, 5e-2)}

# (kernel_size, stride, padding, dilation, groups)
CONFIGS = {
    "k1": (1, 1, 0, 1, 1),
    "k3": (3, 1, 1, 1, 1),
    "k1_stride2": (1, 2, 0, 1, 1),
    "k3_stride2": (3, 2, 1, 1, 1),
    "k3_pad2_dilation2": (3, 1, 2, 2, 1),
    "k3_groups2": (3, 1, 1, 1, 2),
    "k3_depthwise": (3, 1, 1, 1, 4),
}


def _pair(cin=4, cout=8, config="k3", bias=True, device="cpu", dtype=torch.float64, momentum=0.1):
    """A BNReLUConv2d on the kernel and its reference Sequential, with identical random parameters."""
    k, s, p, d, g = CONFIGS[config]
    layer = BNReLUConv2d(cin, cout, k, s, p, d, g, bias=bias, momentum=momentum, impl="kernel")
    with torch.no_grad():  # non-trivial BN state so that every term of the gradient matters
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 1.5)
    layer = layer.to(device, dtype)
    ref = nn.Sequential(OrderedDict(bn=copy.deepcopy(layer.bn), relu=nn.ReLU(), conv=copy.deepcopy(layer.conv)))
    return layer, ref


def _grads(module):
    return [p.grad for p in (module.bn.weight, module.bn.bias, module.conv.weight, module.conv.bias) if p is not None]


def _check_step(layer, ref, x, dtype, run_k=None, run_r=None):
    """One forward + backward of run_k (default: layer) and run_r (default: ref): output, input gradient and
    parameter gradients equal."""
    atol, rtol = TOL[dtype]
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_k, out_r = (run_k or layer)(xk), (run_r or ref)(xr)
    torch.testing.assert_close(out_k, out_r, atol=atol, rtol=rtol)
    grad = torch.randn_like(out_r)
    out_k.backward(grad), out_r.backward(grad)
    torch.testing.assert_close(xk.grad, xr.grad, atol=atol, rtol=rtol)
    for gk, gr in zip(_grads(layer), _grads(ref)):
        torch.testing.assert_close(gk, gr, atol=atol, rtol=rtol)
    return out_k


def _assert_same(layer, ref, x, dtype, training=True, steps=1):
    atol, rtol = TOL[dtype]
    layer.train(training), ref.train(training)
    for _ in range(steps):
        out_k = _check_step(layer, ref, x, dtype)
        for name, buf in ref.bn.named_buffers():
            torch.testing.assert_close(getattr(layer.bn, name), buf, atol=atol, rtol=rtol)
    return out_k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_bn_relu_conv_matches_reference_training(device, dtype, config):
    layer, ref = _pair(config=config, device=device, dtype=dtype)
    x = torch.randn(2, 4, 9, 8, device=device, dtype=dtype) * 2 + 0.3
    _assert_same(layer, ref, x, dtype, training=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", ["k1", "k3_stride2", "k3_groups2"])
def test_bn_relu_conv_matches_reference_eval(device, dtype, config):
    layer, ref = _pair(config=config, device=device, dtype=dtype)
    x = torch.randn(2, 4, 9, 8, device=device, dtype=dtype)
    _assert_same(layer, ref, x, dtype, training=False)
    assert int(layer.bn.num_batches_tracked) == 0  # eval never touches the running statistics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("config", ["k1", "k3_stride2", "k3_groups2"])
def test_bn_relu_conv_matches_reference_channels_last(device, dtype, training, config):
    # 20 channels: the CPU kernel's vector loop and scalar tail both run over the channels of a pixel.
    layer, ref = _pair(cin=20, cout=8, config=config, device=device, dtype=dtype)
    layer, ref = layer.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
    x = torch.randn(2, 20, 7, 6, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    out = _assert_same(layer, ref, x, dtype, training=training)
    cl = torch.channels_last
    assert out.is_contiguous(memory_format=cl) == ref(x).is_contiguous(memory_format=cl)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_conv_non_dense_input_and_no_bias(device):
    layer, ref = _pair(config="k3", bias=False, device=device)
    x = torch.randn(2, 4, 9, 16, device=device, dtype=torch.float64)[..., ::2]  # neither layout: copied
    _assert_same(layer, ref, x, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_stats_identical_to_batchnorm_after_several_steps(device, momentum):
    layer, ref = _pair(config="k3", device=device, momentum=momentum)
    x = torch.randn(3, 4, 5, 5, device=device, dtype=torch.float64) * 3 - 1
    _assert_same(layer, ref, x, torch.float64, training=True, steps=5)
    assert int(layer.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 5
    _assert_same(layer, ref, x, torch.float64, training=False)  # and eval uses them identically


@pytest.mark.parametrize("device", DEVICES)
def test_no_running_stats_uses_batch_statistics_in_eval(device):
    layer, ref = _pair(config="k1", device=device)
    for m in (layer, ref):
        m.bn.track_running_stats = False
        m.bn.running_mean = m.bn.running_var = m.bn.num_batches_tracked = None
    _assert_same(layer, ref, torch.randn(2, 4, 5, 5, device=device, dtype=torch.float64), torch.float64, training=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_shared_preactivation_with_shortcut_matches_reference(device, training):
    layer, ref = _pair(cin=4, cout=6, config="k3_stride2", device=device)
    shortcut = nn.Conv2d(4, 6, 1, 2, bias=False).to(device, torch.float64)
    shortcut_ref = copy.deepcopy(shortcut)
    layer.train(training), ref.train(training)
    x = torch.randn(2, 4, 8, 8, device=device, dtype=torch.float64)
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_k, sc_k = layer(xk, shortcut)
    y = ref.relu(ref.bn(xr))
    out_r, sc_r = ref.conv(y), shortcut_ref(y)
    torch.testing.assert_close(out_k, out_r), torch.testing.assert_close(sc_k, sc_r)
    (out_k.sum() + 2 * sc_k.square().sum()).backward()
    (out_r.sum() + 2 * sc_r.square().sum()).backward()
    torch.testing.assert_close(xk.grad, xr.grad)
    torch.testing.assert_close(shortcut.weight.grad, shortcut_ref.weight.grad)
    for gk, gr in zip(_grads(layer), _grads(ref)):
        torch.testing.assert_close(gk, gr)
    # the running statistics are updated once, not once per use of the shared BN-ReLU
    for name, buf in ref.bn.named_buffers():
        torch.testing.assert_close(getattr(layer.bn, name), buf)


def test_state_dict_matches_reference_sequence():
    layer, ref = _pair(config="k3")
    assert list(layer.state_dict()) == list(ref.state_dict())
    fresh = BNReLUConv2d(4, 8, 3, padding=1, bias=True, impl="kernel").double()
    fresh.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fresh.eval()(x), ref.eval()(x))


def test_reference_impl_is_the_unfused_sequence():
    layer, ref = _pair(config="k3")
    layer.impl = "reference"
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(layer(x), ref(x))


def test_sync_batchnorm_conversion_keeps_the_replacement_forward():
    layer, ref = _pair(config="k3")
    layer = nn.SyncBatchNorm.convert_sync_batchnorm(layer)
    assert type(layer.bn) is nn.SyncBatchNorm
    calls = []
    layer.bn.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x))  # without a process group SyncBatchNorm is plain BN
    assert calls == [1]


def _op_args(device, dtype, training, channels_last=False):
    x = torch.randn(2, 3, 5, 4, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, torch.rand(3, device=device, dtype=dtype) + 0.5, torch.randn(3, device=device, dtype=dtype),
            torch.randn(3, device=device, dtype=dtype), torch.rand(3, device=device, dtype=dtype) + 0.5,
            torch.randn(4, 3, 3, 3, device=device, dtype=dtype), torch.randn(4, device=device, dtype=dtype),
            [2, 1], [1, 1], [1, 1], 1, training, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(device, training):
    x, w, b, rm, rv, cw, cb, stride, padding, dilation, groups, _, eps = _op_args(device, torch.float64, training)

    def fn(x, w, b, cw, cb):
        return ops.bn_relu_conv2d(x, rm.clone(), rv.clone(), w, b, cw, cb, stride, padding, dilation, groups,
                                  training, 0.1, eps)

    inputs = [t.requires_grad_() for t in (x, w, b, cw, cb)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(device, training, channels_last):
    args = list(_op_args(device, torch.float32, training, channels_last))
    for i in (0, 1, 2, 5, 6):
        args[i].requires_grad_()
    if training:
        args[3] = args[4] = None  # the op ignores running statistics in training
    torch.library.opcheck(torch.ops.lightcnn.bn_relu_conv2d.default, tuple(args))
    x, w, b, cw = (args[i].detach() for i in (0, 1, 2, 5))
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    grad_out = torch.randn(2, 4, 3, 4, device=device)
    for has_conv_bias in (True, False):
        back = (grad_out, x, w, b, mean, var, cw, *args[7:], has_conv_bias)
        torch.library.opcheck(torch.ops.lightcnn.bn_relu_conv2d_backward.default, back)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_training_step_matches_eager(device):
    layer, ref = _pair(config="k3_stride2", device=device, dtype=torch.float32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 8, 8, device=device)
    for _ in range(2):  # the in-place running-statistics update must survive compilation
        xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_k, out_r = compiled(xk), ref(xr)
        torch.testing.assert_close(out_k, out_r, atol=2e-5, rtol=2e-4)
        out_k.square().sum().backward(), out_r.square().sum().backward()
        torch.testing.assert_close(xk.grad, xr.grad, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(layer.bn.running_var, ref.bn.running_var)
    assert int(layer.bn.num_batches_tracked) == 2


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_inductor_matches_eager(device):
    layer, ref = _pair(config="k3", device=device, dtype=torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    out = compiled(x)
    torch.testing.assert_close(out, ref(x), atol=2e-5, rtol=2e-4)
    g1 = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(g1, torch.autograd.grad(ref(x).sum(), x)[0], atol=2e-5, rtol=2e-4)


def _autocast_check(device, dtype):
    """The documented policy (lightcnn/ops/bn_relu_conv.py): under autocast the BN-ReLU runs in the input's
    dtype (float32 here) and only the convolution in the autocast dtype, which is also the output's; the
    gradients come back in the parameters' and input's dtypes. Checked against that computation written
    out without autocast, for both implementations."""
    layer, _ = _pair(config="k3", device=device, dtype=torch.float32)
    x = torch.randn(2, 4, 8, 8, device=device)
    expected_layer = copy.deepcopy(layer)
    xe = x.clone().requires_grad_()
    bn, conv = expected_layer.bn, expected_layer.conv
    y = F.relu(F.batch_norm(xe, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, bn.eps))
    expected = F.conv2d(y.to(dtype), conv.weight.to(dtype), conv.bias.to(dtype), padding=1)
    expected.float().square().sum().backward()
    atol, rtol = TOL[dtype]
    for impl in ("kernel", "reference"):
        m = copy.deepcopy(layer)
        m.impl = impl
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=dtype):
            out = m(xi)
        assert out.dtype == dtype, impl
        out.float().square().sum().backward()
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol, msg=impl)
        for got, want in zip([xi.grad, *_grads(m)], [xe.grad, *_grads(expected_layer)]):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol, msg=impl)
        torch.testing.assert_close(m.bn.running_var, bn.running_var, msg=impl)  # statistics in float32


def test_autocast_cpu_bfloat16_policy_bn_in_input_dtype_conv_in_autocast_dtype():
    _autocast_check("cpu", torch.bfloat16)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_policy_bn_in_input_dtype_conv_in_autocast_dtype(dtype):
    _autocast_check("cuda", dtype)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_cuda_matches_reference(dtype, channels_last):
    layer, ref = _pair(cin=20, cout=8, config="k3", device="cuda", dtype=dtype)
    x = torch.randn(4, 20, 16, 16, device="cuda", dtype=dtype)
    if channels_last:
        layer, ref = layer.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_same(layer, ref, x, dtype, training=True, steps=2)


@pytest.mark.cuda
@requires_cuda
def test_half_input_with_float32_batchnorm_cuda():
    # The mixed layout of AMP-style models: half activations, float32 BN parameters and statistics.
    layer, ref = _pair(config="k3", device="cuda", dtype=torch.float32)
    layer.conv.half(), ref.conv.half()
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float16)
    _assert_same(layer, ref, x, torch.float16, training=True, steps=2)


def test_backward_saves_only_the_input_and_per_channel_tensors():
    """The reference keeps the BN input and the ReLU output (two activations); the kernel only the input."""
    x = torch.randn(4, 8, 16, 16, requires_grad=True)

    def saved_activation_bytes(layer):
        storages = {}

        def pack(t):
            if t.numel() >= x.numel():  # activation-sized (the input is 8 x 16 x 16 x 4 values)
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(storages.values())

    kernel, ref = _pair(cin=8, cout=8, config="k3", dtype=torch.float32)
    assert saved_activation_bytes(kernel) == x.numel() * 4
    assert saved_activation_bytes(ref) == 2 * x.numel() * 4


def test_backward_does_not_update_running_stats_again():
    layer, _ = _pair(config="k3")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    before = [b.clone() for b in layer.bn.buffers()]
    out.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.bn.buffers()))


# ---- bad input ----

def _call(**over):
    x, w, b, rm, rv, cw, cb = (torch.randn(2, 3, 5, 5), torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3),
                               torch.randn(4, 3, 3, 3), None)
    kw = dict(input=x, running_mean=rm, running_var=rv, weight=w, bias=b, conv_weight=cw, conv_bias=cb, training=True)
    kw.update(over)
    return ops.bn_relu_conv2d(**kw)


@pytest.mark.parametrize("over, error, match", [
    (dict(input=torch.randn(3, 5, 5)), ValueError, "4-D.*unsqueeze"),
    (dict(input=torch.ones(2, 3, 5, 5, dtype=torch.int64)), TypeError, "floating point"),
    (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(3,\)"),
    (dict(running_var=None), ValueError, "both running_mean and running_var"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "eval mode"),
    (dict(conv_weight=torch.randn(4, 2, 3, 3)), RuntimeError, "input channels"),
    (dict(conv_weight=torch.randn(4, 3, 3)), ValueError, "conv_weight must be 4-D"),
    (dict(conv_bias=torch.zeros(5)), ValueError, r"conv_bias must have shape \(4,\)"),
    (dict(input=torch.randn(1, 3, 1, 1), conv_weight=torch.randn(4, 3, 1, 1)), ValueError, "more than 1 value"),
    (dict(weight=torch.ones(3, dtype=torch.float64)), RuntimeError, "dtype"),
    (dict(input=torch.randn(2, 3, 2, 2)), RuntimeError, "smaller than the dilated kernel"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
])
def test_bad_input_raises_clear_error(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


def test_bad_stride_and_padding_raise():
    with pytest.raises(ValueError, match="stride must be an int or a pair"):
        _call(stride=(1, 2, 3))
    with pytest.raises(ValueError, match="padding='same' is not supported"):
        _call(padding="same")
    with pytest.raises(ValueError, match="padding must be an int or a pair"):
        BNReLUConv2d(3, 4, 3, padding="same")  # the fused kernel takes explicit zero padding


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices_raise():
    with pytest.raises(RuntimeError, match="same device|is on"):
        _call(input=torch.randn(2, 3, 5, 5, device="cuda"), weight=torch.ones(3, device="cuda"),
              bias=torch.zeros(3, device="cuda"), running_mean=None, running_var=None,
              conv_weight=torch.randn(4, 3, 3, 3))


# ---- dropout inside the unit (BN -> ReLU -> Dropout -> Conv, Zagoruyko & Komodakis 2016, Sec. 2.4) ----

def _dropped_reference(ref, x, mask, p):
    """The unfused unit with dropout written out: conv(relu(bn(x)) * mask / (1 - p))."""
    return ref.conv(torch.where(mask, ref.relu(ref.bn(x)) / (1 - p), 0.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("config", ["k3", "k1_stride2"])
def test_dropout_unit_equals_bn_relu_dropout_conv_given_the_same_mask(device, dtype, channels_last, config):
    atol, rtol = TOL[dtype]
    p = 0.3
    layer, ref = _pair(cin=20, cout=8, config=config, device=device, dtype=dtype)
    x = torch.randn(3, 20, 7, 6, device=device, dtype=dtype) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(x.shape, device=device) >= p

    def fused(xk):
        return ops.bn_relu_conv2d(xk, layer.bn.running_mean, layer.bn.running_var, layer.bn.weight, layer.bn.bias,
                                  layer.conv.weight, layer.conv.bias, layer.conv.stride, layer.conv.padding,
                                  training=True, drop_rate=p, drop_mask=mask)

    _check_step(layer, ref, x, dtype, fused, lambda xr: _dropped_reference(ref, xr, mask, p))
    torch.testing.assert_close(layer.bn.running_var, ref.bn.running_var, atol=atol, rtol=rtol)


def _same_seed_runs(fns, x, seed=5):
    """(output, input gradient) of each fn on x, each run from the same seed (so the same dropout mask)."""
    runs = []
    for fn in fns:
        torch.manual_seed(seed)
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.square().sum().backward()
        runs.append((out, xi.grad))
    return runs


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_layer_kernel_equals_reference_from_the_same_seed(device):
    """BNReLUConv2d draws one mask per call for either impl: the same seed gives the same training step."""
    layer, _ = _pair(cin=8, cout=8, config="k3", device=device)
    layer.drop_rate = 0.3
    ref = copy.deepcopy(layer)
    ref.impl = "reference"
    x = torch.randn(2, 8, 6, 6, device=device, dtype=torch.float64)
    (out_k, grad_k), (out_r, grad_r) = _same_seed_runs((layer, ref), x)
    for a, b in ((out_k, out_r), (grad_k, grad_r), (layer.conv.weight.grad, ref.conv.weight.grad),
                 (layer.bn.weight.grad, ref.bn.weight.grad)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_gradcheck(device, channels_last):
    x, w, b, _, _, cw, cb, stride, padding, dilation, groups, _, eps = _op_args(device, torch.float64, True,
                                                                                 channels_last)
    mask = torch.rand(x.shape, device=device) >= 0.4

    def fn(x, w, b, cw, cb):
        return ops.bn_relu_conv2d(x, None, None, w, b, cw, cb, stride, padding, dilation, groups, True, 0.1, eps,
                                  drop_rate=0.4, drop_mask=mask)

    inputs = [t.requires_grad_() for t in (x, w, b, cw, cb)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_dropout_opcheck(device, channels_last):
    args = list(_op_args(device, torch.float32, True, channels_last))
    for i in (0, 1, 2, 5, 6):
        args[i].requires_grad_()
    args[3] = args[4] = None
    mask = torch.rand(args[0].shape, device=device) >= 0.3
    torch.library.opcheck(torch.ops.lightcnn.bn_relu_conv2d.default, (*args, mask, 0.3))
    x, w, b, cw = (args[i].detach() for i in (0, 1, 2, 5))
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    back = (torch.randn(2, 4, 3, 4, device=device), x, w, b, mean, var, cw, *args[7:], True, mask, 0.3)
    torch.library.opcheck(torch.ops.lightcnn.bn_relu_conv2d_backward.default, back)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_inactive_in_eval(device):
    layer, ref = _pair(cin=8, cout=8, config="k3", device=device)
    layer.drop_rate = 0.5
    layer.eval(), ref.eval()
    x = torch.randn(2, 8, 6, 6, device=device, dtype=torch.float64)
    state = torch.get_rng_state()
    torch.testing.assert_close(layer(x), ref(x), atol=1e-10, rtol=1e-10)
    assert torch.equal(torch.get_rng_state(), state)  # no mask drawn
    # the functional form: training=False means no dropout whatever drop_rate says
    out = ops.bn_relu_conv2d(x, layer.bn.running_mean, layer.bn.running_var, layer.bn.weight, layer.bn.bias,
                             layer.conv.weight, layer.conv.bias, padding=1, training=False, drop_rate=0.5)
    torch.testing.assert_close(out, ref(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dropout_drops_the_right_fraction_and_scales_the_rest(device, p):
    """With BN giving relu(bn(x)) = 1 everywhere (gamma 0, beta 1) and an identity 1x1 conv, the output is the
    dropout of a tensor of ones: zeros with probability p, 1 / (1 - p) elsewhere."""
    n = 64 * 16 * 16 * 16
    x = torch.randn(64, 16, 16, 16, device=device)
    eye = torch.eye(16, device=device).view(16, 16, 1, 1)
    out = ops.bn_relu_conv2d(x, None, None, torch.zeros(16, device=device), torch.ones(16, device=device), eye,
                             training=True, drop_rate=p)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5  # five standard deviations of the binomial
    torch.testing.assert_close(out[out != 0], torch.full_like(out[out != 0], 1 / (1 - p)))
    # another call draws another mask
    out2 = ops.bn_relu_conv2d(x, None, None, torch.zeros(16, device=device), torch.ones(16, device=device), eye,
                              training=True, drop_rate=p)
    assert not torch.equal(out == 0, out2 == 0)


def test_dropout_backward_saves_the_input_and_a_one_byte_mask():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    kernel, _ = _pair(cin=8, cout=8, config="k3", dtype=torch.float32)
    kernel.drop_rate = 0.3
    storages = {}

    def pack(t):
        if t.numel() >= x.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kernel(x)
    assert sum(storages.values()) == x.numel() * (4 + 1)


def test_dropout_bad_arguments_raise():
    x, cw = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="drop_rate must be in"):
        ops.bn_relu_conv2d(x, None, None, None, None, cw, training=True, drop_rate=1.0)
    with pytest.raises(ValueError, match="drop_mask must be a bool tensor"):
        ops.bn_relu_conv2d(x, None, None, None, None, cw, training=True, drop_rate=0.3,
                           drop_mask=torch.ones(2, 3, 5, 5))
    with pytest.raises(RuntimeError, match="drop_mask must be a bool tensor"):
        torch.ops.lightcnn.bn_relu_conv2d(x, None, None, None, None, cw, None, [1, 1], [0, 0], [1, 1], 1, True,
                                          1e-5, torch.ones(2, 3, 5, 4, dtype=torch.bool), 0.3)


# ---- impl="auto": the default, chosen per device type, dtype, layout and TF32 (the GPU measurements) -


AUTO_CASES = [
    # (op, config, expected) -- CUDA figures: WRN-28-10 step and LRN on an H200 (benchmarks/RESULTS.md)
    (bn_relu_conv.OP, Config("cpu", torch.float32), "kernel"),  # CPU: same time, half the memory
    (bn_relu_conv.OP, Config("cpu", torch.float32, channels_last=True), "kernel"),
    (bn_relu_conv.OP, Config("cpu", torch.float32, torch.bfloat16), "kernel"),  # BN input float32, conv bf16
    (bn_relu_conv.OP, Config("cpu", torch.bfloat16), "reference"),  # no CPU bf16 kernel
    (bn_relu_conv.OP, Config("cuda", torch.float32, tf32=False), "kernel"),  # 1.08x: within 10%
    (bn_relu_conv.OP, Config("cuda", torch.float32, tf32=True), "reference"),  # 1.27x
    (bn_relu_conv.OP, Config("cuda", torch.float32, torch.bfloat16, channels_last=True), "reference"),  # 2.34x
    (bn_relu_conv.OP, Config("cuda", torch.float32, torch.bfloat16), "reference"),  # shares the cause
    (bn_relu_conv.OP, Config("cuda", torch.float16), "reference"),  # shares the cause, unmeasured
    (bn_relu_conv.OP, Config("cuda", torch.float32, channels_last=True), "reference"),
    (bn_relu_conv.OP, Config("cuda", torch.float64), "kernel"),
    (lrn.OP, Config("cpu", torch.float32, channels_last=True), "kernel"),
    (lrn.OP, Config("cpu", torch.bfloat16), "kernel"),
    (lrn.OP, Config("cuda", torch.float32), "kernel"),
    (lrn.OP, Config("cuda", torch.float32, channels_last=True), "reference"),  # 2.19 ms vs 0.31 compiled
    (lrn.OP, Config("cuda", torch.bfloat16, channels_last=True), "reference"),
]


@pytest.mark.parametrize("op, cfg, expected", AUTO_CASES, ids=[f"{o.name}-{c}" for o, c, _ in AUTO_CASES])
def test_auto_choice_table(op, cfg, expected):
    assert ("kernel" if _library.auto_uses_kernel(op, cfg) else "reference") == expected
    if cfg.dtype in op.dtypes[cfg.device_type]:
        assert ops.backend_info()["ops"][op.name]["auto"][str(cfg)] == expected


def test_auto_is_the_default_and_follows_the_input():
    assert get_default_impl() == "auto"
    layer, _ = _pair(config="k3", dtype=torch.float32)
    layer.impl = None
    x = torch.randn(2, 4, 6, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        layer(x)
    assert "lightcnn::bn_relu_conv2d" in {e.name for e in prof.events()}  # CPU float32: the kernel


def test_config_of_reads_autocast_and_layout():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    assert _library.config_of(x) == Config("cpu", torch.float32, channels_last=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _library.config_of(x, autocast=True) == Config("cpu", torch.float32, torch.bfloat16, True)
        assert _library.config_of(x).autocast_dtype is None  # LRN: autocast does not apply


def test_auto_compiles_fullgraph():
    """No dispatcher query per call: the auto choice folds into the graph."""
    torch._dynamo.reset()
    layer, ref = _pair(config="k3", dtype=torch.float32)
    layer.impl = None
    model = nn.Sequential(layer, LocalResponseNorm(3, alpha=0.1, k=2.0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 4, 6, 6)
    out = compiled(x.clone())
    expected = F.local_response_norm(ref(x.clone()), 3, alpha=0.1, k=2.0)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-4)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_aten_reductions_variant_matches_reference(monkeypatch, dtype, channels_last):
    """The opt-in variant with ATen's SyncBatchNorm reductions (LIGHTCNN_CUDA_BN_REDUCTIONS=aten; not
    the default until a GPU measures it) computes the same unit, dropout included."""
    monkeypatch.setenv("LIGHTCNN_CUDA_BN_REDUCTIONS", "aten")
    layer, ref = _pair(cin=20, cout=8, config="k3", device="cuda", dtype=dtype)
    x = torch.randn(4, 20, 9, 7, device="cuda", dtype=dtype) * 2 + 0.3
    if channels_last:
        layer, ref = layer.to(memory_format=torch.channels_last), ref.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    _assert_same(layer, ref, x, dtype, training=True, steps=2)
    mask = torch.rand(x.shape, device="cuda") >= 0.3
    out = ops.bn_relu_conv2d(x, None, None, layer.bn.weight, layer.bn.bias, layer.conv.weight, layer.conv.bias,
                             padding=1, training=True, drop_rate=0.3, drop_mask=mask)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, _dropped_reference(ref, x, mask, 0.3), atol=atol, rtol=rtol)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_aten_reductions_variant_half_matches_reference(monkeypatch, dtype):
    monkeypatch.setenv("LIGHTCNN_CUDA_BN_REDUCTIONS", "aten")
    layer, ref = _pair(cin=20, cout=8, config="k3", device="cuda", dtype=dtype)
    x = torch.randn(4, 20, 16, 16, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    _assert_same(layer, ref, x, dtype, training=True, steps=2)


def test_layers_backend_info_names_each_layer_types_implementation():
    from lightcnn import layers
    info = layers.backend_info()
    assert info["default_impl"] == layers.get_default_impl() == "auto"
    assert {name: v["op"] for name, v in info["layers"].items()} == {
        "BNReLUConv2d": "bn_relu_conv2d", "LocalResponseNorm": "lrn", "DenseConv2d": "dense_bn_relu_conv2d"}
    for v in info["layers"].values():
        assert v["auto"] == ops.backend_info()["ops"][v["op"]]["auto"]
        assert v["compiled"]["cpu"] is True
    with layers.default_impl("reference"):
        assert layers.backend_info()["default_impl"] == "reference"


@pytest.mark.slow
def test_dropout_under_inductor_matches_eager_with_the_same_seed(monkeypatch):
    """torch.compile (inductor, fullgraph) of the unit with dropout: with inductor's fallback_random (torch's
    own generator), the same seed gives the eager output and gradients."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    layer, _ = _pair(cin=8, cout=8, config="k3", dtype=torch.float32)
    layer.drop_rate = 0.3
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 8, 8, 8)
    for a, b in zip(*_same_seed_runs((compiled, layer), x)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("impl", ["auto", "kernel", "reference"])
def test_layers_run_on_the_meta_device(impl):
    """Shape-only runs (model summaries, FLOP counts on meta): no kernel, no autocast state to ask about."""
    with torch.device("meta"):
        model = nn.Sequential(BNReLUConv2d(4, 8, 3, padding=1, drop_rate=0.3, impl=impl),
                              LocalResponseNorm(3, impl=impl))
        out = model(torch.randn(2, 4, 6, 6))
    assert out.shape == (2, 8, 6, 6) and out.device.type == "meta"
