"""The DenseNet family (its published parameter counts and MACs are asserted in test_model_api.py, the same
MACs on the kernel and the reference path in test_flops.py): the uniform model API, torchvision's weights,
the memory-efficient path against the naive one end to end (outputs, input and parameter gradients, running
statistics, a few SGD steps), torch.compile, DDP, and activation memory that grows linearly with depth."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lightcnn.models import create, is_model, list_models
from lightcnn.models.densenet import DenseNet, convert_torchvision_state_dict
from lightcnn.models.weights import from_torchvision, twins
from lightcnn.ops import _library
from lightcnn.published import MODELS
from tests.helpers import n_params

needs_kernel = pytest.mark.skipif(not _library.op_defined("dense_bn_relu_conv2d"),
                                  reason="lightcnn._C without dense_bn_relu_conv2d (build it first)")

IMAGENET = ["densenet121", "densenet169", "densenet201", "densenet264"]
CIFAR = ["densenet40_k12", "densenet100_k12", "densenet_bc100_k12", "densenet_bc250_k24", "densenet_bc190_k40"]


def _small(impl, dtype=torch.float64, **kw):
    """A small DenseNet-BC: two blocks of 3 and 2 bottleneck layers, k=4, with non-trivial BN state."""
    torch.manual_seed(0)
    m = DenseNet(**dict(dict(growth_rate=4, block_config=(3, 2), num_init_features=6, stem="cifar", num_classes=5,
                             impl=impl), **kw))
    torch.manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5), mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 1.5)
    return m.to(dtype)


def test_parameter_count_densenet161_equals_torchvision():
    torchvision = pytest.importorskip("torchvision")
    assert n_params(create("densenet161")) == n_params(torchvision.models.densenet161(weights=None))


def test_parameter_count_cifar100_adds_classifier_rows():
    expected = MODELS["densenet_bc100_k12"].params + 90 * (342 + 1)
    assert n_params(create("densenet_bc100_k12", num_classes=100)) == expected


def test_registry_names_and_depth_check():
    assert set(IMAGENET + CIFAR + ["densenet161"]) <= set(list_models("densenet*"))
    assert all(is_model(n) for n in IMAGENET + CIFAR)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        from lightcnn.models.densenet import _cifar_args
        _cifar_args(101, 12, True)
    with pytest.raises(ValueError, match="compression"):
        create("densenet_bc100_k12", compression=0.0)


@pytest.mark.parametrize("name, kwargs, side, spatial", [
    ("densenet_bc100_k12", dict(num_classes=100), 32, 8),
    ("densenet40_k12", dict(in_chans=1, num_classes=7, drop_rate=0.2), 32, 8),
    ("densenet121", dict(num_classes=10), 64, 2),
])
def test_uniform_api(name, kwargs, side, spatial):
    m = create(name, impl="reference", **kwargs)
    in_chans, num_classes = kwargs.get("in_chans", 3), kwargs["num_classes"]
    assert (m.in_chans, m.num_classes) == (in_chans, num_classes)
    assert m.default_cfg["num_classes"] == num_classes and len(m.default_cfg["mean"]) == in_chans
    expected_side = 224 if name == "densenet121" else 32
    assert m.default_cfg["input_size"] == (in_chans, expected_side, expected_side)
    if num_classes == 100:
        assert m.default_cfg["dataset"] == "cifar100"
    x = torch.randn(2, in_chans, side, side)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.num_features, spatial, spatial)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    assert m(x).shape == (2, num_classes)
    m.eval()
    torch.testing.assert_close(m(x), m.forward_head(m.forward_features(x)))


def test_torchvision_weights_give_equal_outputs():
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.densenet121(weights=None, num_classes=10).eval()
    with torch.no_grad():  # non-trivial BN state, so that a swapped BN would show
        for mod in tv.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5), mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.5, 0.5), mod.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    for impl in ("kernel", "reference"):
        ours = from_torchvision("densenet121", tv, impl=impl).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not a torchvision DenseNet key"):
        convert_torchvision_state_dict(ours, {"layer1.0.conv1.weight": torch.zeros(1)})
    assert {"densenet121", "densenet161", "densenet169", "densenet201"} <= set(twins("torchvision"))


def test_concat_impl_reference_is_the_naive_path_with_the_same_state_dict():
    eff, naive, ref = _small(None), _small(None, concat_impl="reference"), _small("reference")
    assert list(eff.state_dict()) == list(naive.state_dict()) == list(ref.state_dict())
    assert all(m.impl == "reference" for m in naive.modules() if type(m).__name__ == "DenseConv2d")
    assert all(m.impl is None for m in naive.modules() if type(m).__name__ == "BNReLUConv2d")  # follows `impl`
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(naive.eval()(x), ref.eval()(x))


def test_torchvisions_memory_efficient_is_refused_with_the_new_name():
    # torchvision's memory_efficient=True checkpoints; here the default already stores no concatenation
    with pytest.raises(TypeError, match=r"create\('densenet121'\): DenseNet's 'memory_efficient' is now concat_impl: "
                                        r"memory_efficient=False is concat_impl='reference'"):
        create("densenet121", memory_efficient=False)
    with pytest.raises(TypeError, match=r"concat_impl='kernal' does not fit DenseNet's concat_impl: 'auto' \| "
                                        r"'kernel' \| 'reference' \| None"):
        create("densenet121", concat_impl="kernal")


def _step_all(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    return out, x.grad


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_efficient_and_naive_paths_agree(dtype, tol):
    """Outputs, input gradients, parameter gradients (training and eval) and running statistics. float32:
    the kernels' BN backward sums in another order (in double), ~1e-6 relative through the network."""
    eff, naive = _small("kernel", dtype), _small("reference", dtype)
    x = torch.randn(3, 3, 8, 8, dtype=dtype)
    for training in (True, False, True):
        eff.train(training), naive.train(training)
        eff.zero_grad(), naive.zero_grad()
        (out_e, gx_e), (out_n, gx_n) = _step_all(eff, x), _step_all(naive, x)
        torch.testing.assert_close(out_e, out_n, atol=tol, rtol=tol)
        torch.testing.assert_close(gx_e, gx_n, atol=tol, rtol=tol)
        for (name, pe), pn in zip(eff.named_parameters(), naive.parameters()):
            torch.testing.assert_close(pe.grad, pn.grad, atol=tol, rtol=tol, msg=name)
    for (name, be), bn in zip(eff.named_buffers(), naive.buffers()):
        torch.testing.assert_close(be, bn, atol=tol, rtol=tol, msg=name)
    assert all(int(b) == 2 for n, b in eff.named_buffers() if n.endswith("num_batches_tracked"))


@needs_kernel
def test_three_sgd_steps_end_with_the_same_weights():
    final = []
    for impl in ("kernel", "reference"):
        model = _small(impl, torch.float32, drop_rate=0.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            x, y = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 5, (4,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        final.append(model.state_dict())
    for name, ref in final[1].items():
        torch.testing.assert_close(final[0][name], ref, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow  # inductor compiles the whole network
@needs_kernel
def test_torch_compile_training_step_matches_eager():
    eff, naive = _small("kernel", torch.float32), _small("reference", torch.float32)
    compiled = torch.compile(eff, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 3, 8, 8)
    (out_c, gx_c), (out_n, gx_n) = _step_all(compiled, x), _step_all(naive, x)
    torch.testing.assert_close(out_c, out_n, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_c, gx_n, atol=1e-4, rtol=1e-4)
    for (name, pe), pn in zip(eff.named_parameters(), naive.parameters()):
        torch.testing.assert_close(pe.grad, pn.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, be), bn in zip(eff.named_buffers(), naive.buffers()):
        torch.testing.assert_close(be, bn, atol=1e-5, rtol=1e-5, msg=name)


def _saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct activation storages (4-D tensors: not parameters, not the per-channel batch
    statistics, whose C_i values per layer are negligible) autograd saves during one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if t.dim() == 4 and s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x)
    return sum(storages.values())


@needs_kernel
def test_saved_memory_grows_linearly_with_depth():
    """One dense block of L bottleneck layers (k=4 on 8 input channels): the naive path saves two
    concatenations per layer (quadratic in L), the efficient one the features and bottlenecks (linear).
    Doubling L from 16 to 32 and to 64 must double the efficient path's bytes (second difference ~0),
    while the naive path's grow by ~4x."""
    x = torch.randn(2, 3, 8, 8)
    saved = {}
    for impl in ("kernel", "reference"):
        for L in (16, 32, 64):
            m = DenseNet(growth_rate=4, block_config=(L,), num_init_features=8, stem="cifar", impl=impl)
            saved[impl, L] = _saved_activation_bytes(m, x)
    e16, e32, e64 = (saved["kernel", L] for L in (16, 32, 64))
    n16, n32, n64 = (saved["reference", L] for L in (16, 32, 64))
    # linear: bytes(L) = a + b L, so bytes(64) - bytes(32) == 2 (bytes(32) - bytes(16)) up to the stem/head
    assert (e64 - e32) == pytest.approx(2 * (e32 - e16), rel=0.02)
    assert (n64 - n32) / (n32 - n16) > 3.5  # quadratic: the increments grow ~4x per doubling
    assert e64 < 0.2 * n64


def _units(model):
    """The convolutions in forward order: the stem's, then every DenseConv2d / fused 3x3 unit."""
    from lightcnn.layers import BNReLUConv2d
    return [model.stem.conv0] + [m for m in model.modules() if isinstance(m, BNReLUConv2d)]


@pytest.mark.parametrize("name, per_layer", [("densenet40_k12", 1), ("densenet_bc100_k12", 2)])
def test_dropout_follows_every_convolution_but_the_stem(name, per_layer):
    """Sec. 4.2 and the authors' Lua: dropout after each layer's bottleneck 1x1 and 3x3 and after each
    transition's 1x1, none after the stem. Hooks record the forward order: every convolution unit but the
    stem is followed at once by a Dropout(p=0.2) that reads exactly that unit's output."""
    model = create(name, impl="reference", drop_rate=0.2).train()
    units = _units(model)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    n_layers = sum(model.block_config)
    assert len(units) == 1 + per_layer * n_layers + 2  # stem, the layers' convolutions, two transitions
    assert len(drops) == len(units) - 1 == per_layer * n_layers + 2 and {d.p for d in drops} == {0.2}
    events = []
    for u in units:
        u.register_forward_hook(lambda m, inp, out: events.append(("conv", m, out)))
    for d in drops:
        d.register_forward_hook(lambda m, inp, out: events.append(("drop", m, inp[0])))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert [e[0] for e in events] == ["conv"] + ["conv", "drop"] * (len(units) - 1)
    for (_, unit, out), (_, drop, inp) in zip(events[1::2], events[2::2]):
        assert inp is out  # the dropout reads that convolution's own output
    assert events[0][1] is model.stem.conv0 and events[1][1] is not model.stem.conv0
    assert not any(isinstance(m, torch.nn.Dropout) for m in create(name, impl="reference").modules())


def _lua_forward(m, x, p):
    """The authors' Lua sequence written out: BN-ReLU-Conv1x1-Dropout-BN-ReLU-Conv3x3-Dropout per layer,
    BN-ReLU-Conv1x1-Dropout-AvgPool per transition."""
    def unit(u, h):
        return u.conv(F.relu(u.bn(h)))

    feats = [m.stem(x)]
    for i, block in enumerate(m.blocks):
        for layer in block.layers:
            h = torch.cat(feats, 1)
            if layer.bottleneck is not None:
                h = F.dropout(unit(layer.bottleneck, h), p, True)
            feats.append(F.dropout(unit(layer.conv, h), p, True))
        if i < len(m.transitions):
            feats = [F.avg_pool2d(F.dropout(unit(m.transitions[i].conv, torch.cat(feats, 1)), p, True), 2)]
    return m.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(m.norm(torch.cat(feats, 1))), 1), 1))


@pytest.mark.parametrize("impl", ["reference", pytest.param("kernel", marks=needs_kernel)])
def test_training_forward_is_the_lua_sequence_and_eval_ignores_dropout(impl):
    import copy

    model = _small(impl, drop_rate=0.2)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(5)
    out = model.train()(x)
    torch.manual_seed(5)
    torch.testing.assert_close(out, _lua_forward(ref.train(), x, 0.2), atol=1e-10, rtol=1e-10)
    torch.manual_seed(5)
    assert not torch.allclose(out, _small(impl, drop_rate=0.0).train()(x))  # the masks do act in training
    no_drop = _small(impl, drop_rate=0.0)
    no_drop.load_state_dict(model.state_dict())
    assert list(no_drop.state_dict()) == list(model.state_dict())  # dropout adds no state
    torch.testing.assert_close(model.eval()(x), no_drop.eval()(x), atol=0, rtol=0)


def test_dropout_saves_only_its_masks():
    """Autograd keeps the same activations with dropout as without, plus one mask per dropout (what
    F.dropout saves: a bool mask on GPU, the scaled mask on CPU); the undropped convolution outputs are
    not kept, so the activation memory stays linear in depth."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    probe = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    with_probe = _saved_activation_bytes(torch.nn.Sequential(torch.nn.Dropout(0.2)), probe)
    per_element = with_probe / probe.numel()
    assert per_element in (1, 8)
    masked = []
    model = _small(None, drop_rate=0.2)
    for d in model.modules():
        if isinstance(d, torch.nn.Dropout):
            d.register_forward_hook(lambda m, inp, out: masked.append(out.numel()))
    extra = _saved_activation_bytes(model, x) - _saved_activation_bytes(_small(None, drop_rate=0.0), x)
    assert len(masked) == 2 * 5 + 1 and extra == sum(masked) * per_element


@needs_kernel
def test_saved_memory_with_dropout_grows_linearly_with_depth():
    x = torch.randn(2, 3, 8, 8)
    saved = [_saved_activation_bytes(DenseNet(growth_rate=4, block_config=(L,), num_init_features=8, stem="cifar",
                                              drop_rate=0.2, impl="kernel"), x) for L in (16, 32, 64)]
    assert (saved[2] - saved[1]) == pytest.approx(2 * (saved[1] - saved[0]), rel=0.02)


def _ddp_worker(rank, world, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    grads = {}
    for impl in ("kernel", "reference"):
        model = torch.nn.parallel.DistributedDataParallel(_small(impl, torch.float64))
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        model(x).square().sum().backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    ok = all(torch.allclose(a, b, atol=1e-10, rtol=1e-10) for a, b in zip(grads["kernel"], grads["reference"]))
    results[rank] = ok
    dist.destroy_process_group()


@pytest.mark.slow
@needs_kernel
def test_ddp_gradients_match_the_naive_path():
    """Two gloo processes: DDP's all-reduced gradients of the efficient model equal the naive model's. Slow (two
    fresh processes); the fast suite has the paths' equal gradients in one process
    (test_efficient_and_naive_paths_agree) and a DDP fit in two (tests/test_fit_ddp.py)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    assert dict(results) == {0: True, 1: True}
