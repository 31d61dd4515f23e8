"""The memory-efficient DenseNet op (torch.ops.lightcnn.dense_bn_relu_conv2d) and DenseConv2d against the naive
sequence conv(relu(bn(torch.cat(features, 1)))): outputs, every gradient, running statistics, eval mode, both
layouts, gradcheck, opcheck, torch.compile, autocast, FLOP counts, what the backward saves, DDP, and errors
on bad input. CUDA twins run on a GPU and skip without one."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightcnn import ops
from lightcnn.layers import DenseConv2d
from lightcnn.ops import _library, reference
from tests.conftest import DEVICES, requires_cuda
from tests.samples_dense import CUDA_ONLY, GRADCHECK, KINDS, OPCHECK, SAMPLES

pytestmark = pytest.mark.skipif(not _library.op_defined("dense_bn_relu_conv2d"),
                                reason="lightcnn._C without dense_bn_relu_conv2d (build it first)")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 convolutions on a GPU: with TF32, equal-to-an-ulp conv inputs could round apart."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


# (atol, rtol). float32: the kernel's BN backward sums in another order than ATen's (in double on the CPU),
# so outputs and gradients agree to a few float32 ulps of their largest terms.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-4), torch.float16: (2e-2, 2e-2),
       torch.bfloat16: (1e-1, 5e-2)}
CHANNELS = (5, 3, 3, 7)  # an odd block input and three odd "growth" pieces


def _features(device, dtype, channels=CHANNELS, shape=(3, 5, 7), channels_last=False):
    n, h, w = shape
    fs = [torch.randn(n, c, h, w, device=device, dtype=dtype) for c in channels]
    return [f.contiguous(memory_format=torch.channels_last) for f in fs] if channels_last else fs


CIN = sum(CHANNELS)


def _pair(cin=CIN, cout=6, kernel_size=1, device="cpu", dtype=torch.float64, momentum=0.1):
    """A DenseConv2d on the kernel and its reference Sequential, with identical non-trivial parameters."""
    layer = DenseConv2d(cin, cout, kernel_size, padding=kernel_size // 2, momentum=momentum, impl="kernel")
    with torch.no_grad():
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.5, 1.5)
    layer = layer.to(device, dtype)
    ref = nn.Sequential(OrderedDict(bn=copy.deepcopy(layer.bn), relu=nn.ReLU(), conv=copy.deepcopy(layer.conv)))
    return layer, ref


def _assert_same(layer, ref, feats, dtype, training=True, steps=2):
    atol, rtol = TOL[dtype]
    layer.train(training), ref.train(training)
    for _ in range(steps):
        fk = [f.clone().requires_grad_() for f in feats]
        fr = [f.clone().requires_grad_() for f in feats]
        out_k, out_r = layer(fk), ref(torch.cat(fr, 1))
        torch.testing.assert_close(out_k, out_r, atol=atol, rtol=rtol)
        grad = torch.randn_like(out_r)
        out_k.backward(grad), out_r.backward(grad)
        for a, b in zip(fk, fr):
            torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=rtol)
        for pk, pr in zip((layer.bn.weight, layer.bn.bias, layer.conv.weight), ref.parameters()):
            torch.testing.assert_close(pk.grad, pr.grad, atol=atol, rtol=rtol)
        for name, buf in ref.bn.named_buffers():
            torch.testing.assert_close(getattr(layer.bn, name), buf, atol=atol, rtol=rtol)
    return out_k, fk


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel_size", [1, 3])
@pytest.mark.parametrize("training", [True, False])
def test_dense_op_matches_naive_concatenation(device, dtype, kernel_size, training):
    layer, ref = _pair(kernel_size=kernel_size, device=device, dtype=dtype)
    _assert_same(layer, ref, _features(device, dtype), dtype, training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_dense_op_channels_last_matches_and_keeps_layout(device, training):
    layer, ref = _pair(device=device, dtype=torch.float64)
    _, fk = _assert_same(layer, ref, _features(device, torch.float64, channels_last=True), torch.float64, training)
    assert all(f.grad.is_contiguous(memory_format=torch.channels_last) for f in fk)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_op_mixed_layouts_non_contiguous_and_single_feature(device):
    feats = _features(device, torch.float64)
    feats[1] = feats[1].contiguous(memory_format=torch.channels_last)
    feats[2] = torch.randn(3, 5, 3, 7, device=device, dtype=torch.float64).transpose(1, 2)  # non-dense strides
    layer, ref = _pair(device=device)
    _assert_same(layer, ref, feats, torch.float64)
    one, ref1 = _pair(cin=4, device=device)
    _assert_same(one, ref1, _features(device, torch.float64, channels=(4,), shape=(1, 1, 2)), torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_identical_to_batchnorm_after_several_steps(device, momentum):
    layer, ref = _pair(device=device, dtype=torch.float32, momentum=momentum)
    _assert_same(layer, ref, _features(device, torch.float32), torch.float32, steps=3)
    assert int(layer.bn.num_batches_tracked) == 3


_DIFFERENTIABLE = ("weight", "bias", "conv_weight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_op_matches_reference_on_every_sample(device, kind, dtype):
    """Every sample of tests/samples_dense.py through lightcnn.ops.dense_bn_relu_conv2d against the naive
    concatenation: output, the gradients of every feature and parameter, the running statistics."""
    atol, rtol = TOL[dtype]
    for sample in SAMPLES.values():
        if device == "cpu" and sample.name in CUDA_ONLY:
            continue
        args, grad, runs = sample.make(dtype, kind, device), None, []
        for fn in (ops.dense_bn_relu_conv2d, reference.dense_bn_relu_conv2d):
            kw = args.functional()
            kw.update(running_mean=args.running_mean.clone(), running_var=args.running_var.clone(),
                      features=[f.detach().clone().requires_grad_() for f in args.features])
            kw.update({n: kw[n].detach().clone().requires_grad_() for n in _DIFFERENTIABLE if kw[n] is not None})
            leaves = [*kw["features"], *(kw[n] for n in _DIFFERENTIABLE if kw[n] is not None)]
            out = fn(**kw)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
            runs.append((out, *(t.grad for t in leaves), kw["running_mean"], kw["running_var"]))
        for i, (got, want) in enumerate(zip(*runs, strict=True)):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{sample} result {i}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, kind", GRADCHECK)
def test_gradcheck(device, kind, name):
    args = SAMPLES[name].make(torch.float64, kind, device)
    names = [n for n in _DIFFERENTIABLE if getattr(args, n) is not None]
    n_features = len(args.features)

    def fn(*tensors):
        kw = dict(args.functional(), features=list(tensors[:n_features]), **dict(zip(names, tensors[n_features:])))
        kw.update(running_mean=args.running_mean.clone(), running_var=args.running_var.clone())
        return ops.dense_bn_relu_conv2d(**kw)

    inputs = [t.requires_grad_() for t in (*args.features, *(getattr(args, n) for n in names))]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, kind", OPCHECK)
def test_opcheck(device, kind, name):
    args = SAMPLES[name].make(torch.float32, kind, device)
    rm, rv = args.running_mean, args.running_var
    if args.training:
        args.running_mean = args.running_var = None  # the op ignores running statistics in training
    grad_out = torch.randn_like(torch.ops.lightcnn.dense_bn_relu_conv2d(*args.op())[0])
    back = args.backward(grad_out, rm, rv)  # before requires_grad_: the backward's inputs need no gradient
    back[1] = list(back[1])
    for t in (*args.features, *(getattr(args, n) for n in _DIFFERENTIABLE)):
        if t is not None:
            t.requires_grad_()
    torch.library.opcheck(torch.ops.lightcnn.dense_bn_relu_conv2d.default, tuple(args.op()))
    back = [[f.detach() for f in v] if isinstance(v, list) and v and isinstance(v[0], torch.Tensor)
            else v.detach() if isinstance(v, torch.Tensor) else v for v in back]
    torch.library.opcheck(torch.ops.lightcnn.dense_bn_relu_conv2d_backward.default, tuple(back))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_training_step_matches_eager(device):
    layer, ref = _pair(device=device, dtype=torch.float32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    feats = _features(device, torch.float32)
    for _ in range(2):  # the in-place running-statistics update must survive compilation
        fk, fr = [f.clone().requires_grad_() for f in feats], [f.clone().requires_grad_() for f in feats]
        out_k, out_r = compiled(fk), ref(torch.cat(fr, 1))
        torch.testing.assert_close(out_k, out_r, atol=2e-5, rtol=2e-4)
        out_k.square().sum().backward(), out_r.square().sum().backward()
        for a, b in zip(fk, fr):
            torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(layer.bn.running_var, ref.bn.running_var)
    assert int(layer.bn.num_batches_tracked) == 2


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    layer, ref = _pair(dtype=torch.float32, kernel_size=3)
    compiled = torch.compile(layer, fullgraph=True)
    feats = [f.requires_grad_() for f in _features("cpu", torch.float32)]
    out = compiled(feats)
    torch.testing.assert_close(out, ref(torch.cat(feats, 1)), atol=2e-5, rtol=2e-4)
    g = torch.autograd.grad(out.sum(), feats)
    g_ref = torch.autograd.grad(ref(torch.cat(feats, 1)).sum(), feats)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


def _autocast_check(device, dtype):
    """The policy: the convolution runs in the autocast dtype and the BN-ReLU in the features' float32,
    exactly as autocast treats the unfused sequence; output and conv-weight gradient dtypes follow suit."""
    layer, ref = _pair(device=device, dtype=torch.float32, kernel_size=3)
    feats = _features(device, torch.float32)
    outs, grads = [], []
    for m, concat in ((layer, False), (ref, True)):
        fs = [f.clone().requires_grad_() for f in feats]
        with torch.autocast(device, dtype=dtype):
            out = m(torch.cat(fs, 1) if concat else fs)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([f.grad for f in fs] + [m.bn.weight.grad, m.conv.weight.grad])
    assert outs[0].dtype == dtype
    # the same computation written out by hand: float32 BN-ReLU, conv in `dtype`
    y = torch.relu(torch.nn.functional.batch_norm(torch.cat(feats, 1), None, None, ref.bn.weight.detach(),
                                                  ref.bn.bias.detach(), True))
    manual = torch.nn.functional.conv2d(y.to(dtype), ref.conv.weight.detach().to(dtype), padding=1)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(outs[0], manual, atol=atol, rtol=rtol)
    torch.testing.assert_close(outs[0], outs[1].to(dtype), atol=atol, rtol=rtol)
    for gk, gr in zip(*grads):
        assert gk.dtype == torch.float32
        torch.testing.assert_close(gk, gr.float(), atol=atol * 10, rtol=rtol)


def test_autocast_cpu_bfloat16_policy():
    _autocast_check("cpu", torch.bfloat16)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_policy(dtype):
    _autocast_check("cuda", dtype)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_precision_cuda_matches_reference(dtype, channels_last):
    layer, ref = _pair(device="cuda", dtype=torch.float32)
    layer.conv.to(dtype), ref.conv.to(dtype)
    _assert_same(layer, ref, _features("cuda", dtype, shape=(8, 9, 11), channels_last=channels_last), dtype)


@pytest.mark.cuda
@requires_cuda
def test_many_features_cuda_matches_reference():
    """More features than one kernel launch takes (the CUDA kernels handle them in chunks of 64)."""
    channels = (6,) + (1, 2) * 50
    layer, ref = _pair(cin=sum(channels), device="cuda", dtype=torch.float64)
    _assert_same(layer, ref, _features("cuda", torch.float64, channels=channels), torch.float64)


def test_flop_count_equals_the_naive_sequence():
    layer, ref = _pair(dtype=torch.float32, kernel_size=3)
    feats = [f.requires_grad_() for f in _features("cpu", torch.float32)]
    counts = []
    for run in (lambda: layer(feats), lambda: ref(torch.cat(feats, 1))):
        counter = FlopCounterMode(display=False)
        with counter:
            run().sum().backward()
        counts.append(counter.get_total_flops())
    n, h, w = 3, 5, 7
    forward = 2 * n * h * w * 6 * sum(CHANNELS) * 9
    assert counts[0] == counts[1] == 3 * forward  # forward, grad of input, grad of weight


def test_backward_saves_the_features_and_per_channel_tensors_only():
    """The naive layer keeps its concatenation and its BN-ReLU output (each as wide as all the features); the
    op keeps references to the features themselves and nothing activation-sized of its own."""
    feats = [f.requires_grad_() for f in _features("cpu", torch.float32, shape=(4, 8, 8))]
    feature_storages = {f.untyped_storage().data_ptr() for f in feats}
    total = sum(f.numel() for f in feats) * 4
    smallest = min(f.numel() for f in feats)

    def saved(fn):
        new, reused = {}, set()

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr in feature_storages:
                reused.add(ptr)
            elif t.numel() >= smallest:  # activation-sized (weights and per-channel tensors are smaller here)
                new[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(new.values()), len(reused)

    layer, ref = _pair(dtype=torch.float32)
    assert saved(lambda: layer(feats)) == (0, len(feats))
    new_bytes, _ = saved(lambda: ref(torch.cat(feats, 1)))
    assert new_bytes == 2 * total


def test_backward_does_not_update_running_stats_again():
    layer, _ = _pair()
    out = layer([f.requires_grad_() for f in _features("cpu", torch.float64)])
    before = [b.clone() for b in layer.bn.buffers()]
    out.sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.bn.buffers()))


def test_calls_with_different_shapes_interleave_without_shared_state():
    """No state is kept between calls (what DDP replicas and concurrent models rely on)."""
    a, ref_a = _pair(cin=sum(CHANNELS))
    b, ref_b = _pair(cin=4, cout=2, kernel_size=3)
    fa, fb = _features("cpu", torch.float64), _features("cpu", torch.float64, channels=(1, 3), shape=(2, 4, 4))
    outs = [a(fa), b(fb), a(fa)]
    torch.testing.assert_close(outs[0], outs[2])
    torch.testing.assert_close(outs[0], ref_a.train()(torch.cat(fa, 1)))
    torch.testing.assert_close(outs[1], ref_b.train()(torch.cat(fb, 1)))


def test_reference_impl_and_sync_batchnorm_run_the_naive_sequence():
    layer, ref = _pair()
    layer.impl = "reference"
    feats = _features("cpu", torch.float64)
    torch.testing.assert_close(layer(feats), ref(torch.cat(feats, 1)))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(_pair()[0])
    assert type(converted.bn) is nn.SyncBatchNorm and converted.impl == "kernel"


def test_state_dict_matches_reference_sequence():
    layer, ref = _pair()
    assert list(layer.state_dict()) == list(ref.state_dict())


# ---- bad input ----

def _call(**over):
    kw = dict(features=_features("cpu", torch.float32, channels=(2, 3)), running_mean=torch.zeros(5),
              running_var=torch.ones(5), weight=torch.ones(5), bias=torch.zeros(5),
              conv_weight=torch.randn(4, 5, 1, 1), training=True)
    kw.update(over)
    return ops.dense_bn_relu_conv2d(**kw)


@pytest.mark.parametrize("over, error, match", [
    (dict(features=torch.randn(2, 5, 3, 3)), TypeError, "list of"),
    (dict(features=[]), TypeError, "non-empty list"),
    (dict(features=[torch.randn(2, 2, 3, 3), torch.randn(2, 3, 4, 3)]), ValueError, "N, H and W must agree"),
    (dict(features=[torch.randn(2, 2, 3, 3), torch.randn(2, 3, 3, 3).double()]), ValueError, "share"),
    (dict(features=[torch.randn(2, 5, 3)]), ValueError, "4-D"),
    (dict(features=[torch.ones(2, 5, 3, 3, dtype=torch.int64)]), TypeError, "floating point"),
    (dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(5,\)"),
    (dict(conv_weight=torch.randn(4, 4, 1, 1)), ValueError, r"conv_weight must be \(C_out, 5"),
    (dict(running_var=None), ValueError, "both running_mean and running_var"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "eval mode"),
    (dict(features=[torch.randn(1, 5, 1, 1)]), ValueError, "more than 1 value"),
    (dict(padding=-1), ValueError, "padding"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
])
def test_bad_input_raises_clear_error(over, error, match):
    with pytest.raises(error, match=match):
        _call(**over)


def test_kernel_checks_bad_input_too():
    """The C++ op checks what the Python face checks, for callers of torch.ops.lightcnn directly."""
    f = _features("cpu", torch.float32, channels=(2, 3))
    with pytest.raises(RuntimeError, match="conv_weight must be"):
        torch.ops.lightcnn.dense_bn_relu_conv2d(f, None, None, None, None, torch.randn(4, 4, 1, 1), [0, 0], True,
                                                1e-5)
    with pytest.raises(RuntimeError, match="empty list"):
        torch.ops.lightcnn.dense_bn_relu_conv2d([], None, None, None, None, torch.randn(4, 4, 1, 1), [0, 0], True,
                                                1e-5)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        torch.ops.lightcnn.dense_bn_relu_conv2d(f, None, None, None, None, torch.randn(4, 5, 9, 9), [0, 0], True,
                                                1e-5)


def test_reference_is_the_naive_sequence():
    feats = _features("cpu", torch.float64)
    cw = torch.randn(4, sum(CHANNELS), 1, 1, dtype=torch.float64)
    rm, rv = torch.zeros(sum(CHANNELS), dtype=torch.float64), torch.ones(sum(CHANNELS), dtype=torch.float64)
    out = reference.dense_bn_relu_conv2d(feats, rm, rv, None, None, cw, 0, True)
    x = torch.cat(feats, 1)
    expected = torch.nn.functional.conv2d(torch.relu((x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)), cw)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var((0, 2, 3)))
