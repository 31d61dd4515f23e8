"""The pre-activation family (pre-act ResNet, Wide ResNet): exact parameter counts and MACs of
REFERENCE.md, the uniform model API, the wrn{depth}_{k} name pattern, and the fused kernel against the
reference implementation end to end (same outputs, and the same weights after a few training steps)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from lightcnn.models import create, is_model, list_models
from lightcnn.ops import _library

needs_kernel = pytest.mark.skipif(not _library.op_defined("bn_relu_conv2d"),
                                  reason="lightcnn._C without bn_relu_conv2d (build it first)")


def _params(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _gmacs(m, size=32):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2 / 1e9


@pytest.mark.parametrize("name, params", [
    ("preact_resnet164", 1_703_258),
    ("wrn28_10", 36_479_194),
    ("wrn16_8", 10_961_370),
    ("wrn40_4", 8_949_210),
])
def test_parameter_count_matches_reference(name, params):
    assert _params(create(name, num_classes=10)) == params


def test_parameter_count_preact_resnet1001():
    assert _params(create("preact_resnet1001", num_classes=10)) == 10_327_706


def test_parameter_count_cifar100_adds_classifier_rows():
    # REFERENCE.md: CIFAR-100 adds 90 x (classifier input + 1)
    assert _params(create("wrn28_10", num_classes=100)) == 36_479_194 + 90 * (640 + 1)


def test_parameter_count_preact_resnet18_from_torchvision():
    """torchvision's ResNet-18 re-counted for the pre-activation CIFAR layout: a 3x3 stem without BN instead of
    the 7x7 stem + BN, BN on each unit's input instead of its output (the first unit of stages 2-4 has half
    as many input channels), no BN on the projection shortcuts, one final BN, 10 classes."""
    tv = _params(torchvision.models.resnet18(num_classes=10))
    stem = 3 * 64 * 9 - (3 * 64 * 49 + 2 * 64)
    unit_bn = -sum(2 * c // 2 for c in (128, 256, 512))  # bn1 over c/2 inputs instead of c outputs
    shortcut_bn = -sum(2 * c for c in (128, 256, 512))
    final_bn = 2 * 512
    assert _params(create("preact_resnet18")) == tv + stem + unit_bn + shortcut_bn + final_bn


@pytest.mark.parametrize("name, gmacs", [("preact_resnet164", 0.2445), ("wrn16_8", 1.548), ("wrn40_4", 1.299)])
def test_macs_match_reference(name, gmacs):
    assert _gmacs(create(name, impl="reference")) == pytest.approx(gmacs, rel=1e-3)


@pytest.mark.slow
def test_macs_wrn28_10():
    assert _gmacs(create("wrn28_10", impl="reference")) == pytest.approx(5.243, rel=1e-3)


def test_registry_names_and_wrn_pattern():
    assert {"preact_resnet18", "preact_resnet164", "preact_resnet1001", "wrn28_10", "wrn16_8", "wrn40_4"} <= set(
        list_models())
    assert is_model("wrn10_1") and is_model("wrn22_8")
    m = create("wrn22_8")
    assert (m.depth, m.widen_factor) == (22, 8)
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        create("wrn12_2")
    with pytest.raises(ValueError, match="depth must be 6n \\+ 4"):
        create("wrn4_1")


@pytest.mark.parametrize("name, kwargs", [
    ("wrn10_1", dict(in_chans=1, num_classes=7)),
    ("wrn10_2", dict(drop_rate=0.3)),
    ("preact_resnet18", dict(num_classes=100)),
])
def test_uniform_api(name, kwargs):
    m = create(name, impl="reference", **kwargs)
    in_chans, num_classes = kwargs.get("in_chans", 3), kwargs.get("num_classes", 10)
    assert (m.in_chans, m.num_classes) == (in_chans, num_classes)
    assert m.default_cfg["input_size"] == (in_chans, 32, 32) and m.default_cfg["num_classes"] == num_classes
    assert len(m.default_cfg["mean"]) == in_chans
    x = torch.randn(2, in_chans, 32, 32)
    feats = m.forward_features(x)
    spatial = 4 if name == "preact_resnet18" else 8  # strides 1, 2, 2, 2 vs 1, 2, 2
    assert feats.shape == (2, m.num_features, spatial, spatial)
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    assert m(x).shape == (2, num_classes)
    torch.testing.assert_close(m.eval()(x), m.forward_head(m.forward_features(x)))


@needs_kernel
@pytest.mark.parametrize("name", ["wrn10_2", "preact_resnet164"])
def test_kernel_and_reference_models_agree(name):
    kw = dict(layers=(1, 1, 1)) if name == "preact_resnet164" else {}
    torch.manual_seed(0)
    kernel = create(name, impl="kernel", **kw).double()
    torch.manual_seed(0)
    ref = create(name, impl="reference", **kw).double()
    assert list(kernel.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (True, False):
        kernel.train(training), ref.train(training)
        xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_k, out_r = kernel(xk), ref(xr)
        torch.testing.assert_close(out_k, out_r, atol=1e-10, rtol=1e-10)
        out_k.square().sum().backward(), out_r.square().sum().backward()
        torch.testing.assert_close(xk.grad, xr.grad, atol=1e-10, rtol=1e-10)
        for (n, pk), pr in zip(kernel.named_parameters(), ref.parameters()):
            torch.testing.assert_close(pk.grad, pr.grad, atol=1e-9, rtol=1e-9, msg=n)
    for (n, bk), br in zip(kernel.named_buffers(), ref.buffers()):
        torch.testing.assert_close(bk, br, atol=1e-12, rtol=1e-12, msg=n)


@needs_kernel
def test_wrn16_8_three_training_steps_kernel_equals_reference():
    """A whole WRN-16-8 (dropout 0.3, the paper's SGD recipe) trained 3 steps from the same seed ends with
    the same weights and running statistics on the fused kernel as on the reference sequence.

    In float64: in float32 the two differ by ~1e-7 relative after one forward (the kernel sums in another
    order), and three SGD steps at lr 0.1 amplify that chaotically (up to 2e-2 relative on some BN biases
    at batch 2, more at batch 16: BN's backward divides by the batch standard deviation), so a float32
    comparison cannot tell a bug from rounding. In float64 the same computation agrees to ~1e-13 relative.
    Dropout masks are drawn from the seeded generator in the same order on both paths."""
    final = []
    for impl in ("kernel", "reference"):
        torch.manual_seed(0)
        model = create("wrn16_8", impl=impl, drop_rate=0.3).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        data = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(2, 3, 32, 32, generator=data), torch.randint(0, 10, (2,), generator=data)
            loss = torch.nn.functional.cross_entropy(model(x.double()), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final.append(model.state_dict())
    for name, ref in final[1].items():
        torch.testing.assert_close(final[0][name], ref, atol=1e-9, rtol=1e-9, msg=name)
