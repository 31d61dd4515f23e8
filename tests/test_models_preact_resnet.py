"""The pre-activation family (pre-act ResNet, Wide ResNet): exact parameter counts and MACs of
lightcnn/published.py, the uniform model API, the wrn{depth}_{k} name pattern, and the fused kernel against the
reference implementation end to end (same outputs, and the same weights after a few training steps)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from lightcnn.models import create, is_model, list_models
from lightcnn.ops import _library
from lightcnn.published import published
from tests.helpers import macs, n_params

needs_kernel = pytest.mark.skipif(not _library.op_defined("bn_relu_conv2d"),
                                  reason="lightcnn._C without bn_relu_conv2d (build it first)")


@pytest.mark.parametrize("name", ["preact_resnet164", "preact_resnet1001", "wrn28_10", "wrn16_8", "wrn40_4"])
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        assert n_params(create(name, num_classes=10)) == published(name).params


def test_parameter_count_cifar100_adds_classifier_rows():
    # published.py: CIFAR-100 adds 90 x (classifier input + 1)
    with torch.device("meta"):
        assert n_params(create("wrn28_10", num_classes=100)) == published("wrn28_10").params + 90 * (640 + 1)


def test_parameter_count_preact_resnet18_from_torchvision():
    """torchvision's ResNet-18 re-counted for the pre-activation CIFAR layout: a 3x3 stem without BN instead of
    the 7x7 stem + BN, BN on each unit's input instead of its output (the first unit of stages 2-4 has half
    as many input channels), no BN on the projection shortcuts, one final BN, 10 classes."""
    tv = n_params(torchvision.models.resnet18(num_classes=10))
    stem = 3 * 64 * 9 - (3 * 64 * 49 + 2 * 64)
    unit_bn = -sum(2 * c // 2 for c in (128, 256, 512))  # bn1 over c/2 inputs instead of c outputs
    shortcut_bn = -sum(2 * c for c in (128, 256, 512))
    final_bn = 2 * 512
    assert n_params(create("preact_resnet18")) == tv + stem + unit_bn + shortcut_bn + final_bn


@pytest.mark.parametrize("name", ["preact_resnet164", "wrn16_8", "wrn40_4",
                                  pytest.param("wrn28_10", marks=pytest.mark.slow)])
def test_macs_match_published(name):
    gmacs = macs(create(name, impl="reference"), 32, device="cpu") / 1e9
    assert gmacs == pytest.approx(published(name).gmacs, rel=1e-3)


def test_registry_names_and_wrn_pattern():
    assert {"preact_resnet18", "preact_resnet164", "preact_resnet1001", "wrn28_10", "wrn16_8", "wrn40_4"} <= set(
        list_models())
    assert is_model("wrn10_1") and is_model("wrn22_8")
    with torch.device("meta"):
        m = create("wrn22_8")
    assert [len(getattr(m, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]  # n = (22 - 4) / 6
    assert [getattr(m, f"layer{i}")[0].conv1.conv.out_channels for i in (1, 2, 3)] == [128, 256, 512]  # 16k..64k
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


# ---------------------------------------------------------------------------------------- paper fidelity
def test_wrn_dropout_sits_between_relu_and_conv_not_before_bn():
    """WRN Sec. 2.4 and wide-resnet.lua: BN-ReLU-Dropout-Conv. The second unit's BN sees conv1's output
    untouched (no exact zeros); its conv sees the ReLU output with ~30% of the positive entries zeroed and
    the rest scaled by 1 / 0.7; in eval the conv sees the ReLU output itself."""
    torch.manual_seed(0)
    m = create("wrn16_2", drop_rate=0.3, impl="reference")
    unit = m.layer1[1].conv2
    seen = {}
    hooks = [unit.bn.register_forward_pre_hook(lambda mod, args: seen.__setitem__("bn_in", args[0].detach())),
             unit.relu.register_forward_hook(lambda mod, args, out: seen.__setitem__("relu_out", out.detach())),
             unit.conv.register_forward_pre_hook(lambda mod, args: seen.__setitem__("conv_in", args[0].detach()))]
    x = torch.randn(8, 3, 32, 32)
    m.train()(x)
    assert (seen["bn_in"] == 0).float().mean() < 1e-3
    positive = seen["relu_out"] > 0
    dropped = (seen["conv_in"] == 0) & positive
    assert 0.27 < dropped.sum() / positive.sum() < 0.33
    kept = positive & ~dropped
    torch.testing.assert_close(seen["conv_in"][kept], seen["relu_out"][kept] / 0.7)
    m.eval()(x)
    torch.testing.assert_close(seen["conv_in"], seen["relu_out"], rtol=0, atol=0)
    assert m.layer1[1].conv1.drop_rate == 0.0  # the first unit's output also feeds the shortcut
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("name, mode", [("wrn16_8", "fan_in"), ("preact_resnet164", "fan_out")])
def test_he_init_fan_of_the_authors_code_and_zero_classifier_bias(name, mode):
    """WRN's MSRinit divides by k*k*in; the pre-act ResNet code (resnet-1k-layers) by k*k*out. Both zero
    the classifier's bias."""
    torch.manual_seed(0)
    m = create(name, num_classes=100)
    checked = 0
    for conv in (mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        fan_in, fan_out = k * conv.in_channels, k * conv.out_channels
        if conv.weight.numel() > 4000 and max(fan_in, fan_out) >= 2 * min(fan_in, fan_out):
            fan = fan_in if mode == "fan_in" else fan_out
            assert conv.weight.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.05)
            checked += 1
    assert checked
    assert torch.count_nonzero(m.fc.bias) == 0


@pytest.mark.parametrize("name", ["wrn16_8", "sd_resnet110"])
def test_bn_scale_starts_as_torch7s_reset_in_the_authors_cifar_code(name):
    """WRN's and stochastic depth's Torch code never re-initialise BN, so Torch7's reset applies: scale
    U(0, 1), shift 0. `bn_weight_init="ones"` gives PyTorch's 1; other lightcnn networks keep 1."""
    torch.manual_seed(0)
    bns = [m for m in create(name).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    w = torch.cat([b.weight.detach() for b in bns]).double()
    assert w.numel() > 3000 and 0 <= w.min() and w.max() <= 1
    assert w.mean().item() == pytest.approx(0.5, abs=0.03) and w.var().item() == pytest.approx(1 / 12, rel=0.1)
    assert all(torch.count_nonzero(b.bias) == 0 for b in bns)
    ones = [m.weight for m in create(name, bn_weight_init="ones").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(o, torch.ones_like(o)) for o in ones)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in create("preact_resnet164").modules()
               if isinstance(m, torch.nn.BatchNorm2d))
