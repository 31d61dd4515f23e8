"""ResNet, ResNeXt, stochastic-depth ResNet and the torchvision weight import.

The published parameter counts and MACs of every model are asserted in test_model_api.py; the counts here
(CIFAR-100 heads, the v1.5 layout, the projection shortcuts) are taken on the meta device (no memory, no
compute). Forward/backward at the native input size runs on the CPU with batch 2; the big nets are marked slow.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightcnn.models import create, list_models
from lightcnn.models.base import init_he_
from lightcnn.models.resnet import BasicBlock, ResNet, ZeroPadShortcut, survival_probabilities
from lightcnn.models.weights import TWINS, from_torchvision
from lightcnn.published import MODELS as PUBLISHED
from tests.helpers import MetaShapes, build_meta, macs, n_params

FAMILY = ("resnet", "resnext", "sd_resnet")
# lightcnn/published.py: the exact parameter count of every model of the family.
PARAMS = {n: p.params for n, p in PUBLISHED.items() if n.startswith(FAMILY)}
# torchvision's v1.5 layout of the bottleneck nets (published.py's notes give these MACs).
GMACS_V15 = {"resnet50": 4.089, "resnet101": 7.801, "resnet152": 11.514}

MODELS = sorted(PARAMS)
SLOW = {"resnet101", "resnet152", "sd_resnet152", "resnext29_16x64d", "resnext101_32x8d", "resnet1202",
        "sd_resnet1202"}
DEEP = {"resnet1202", "sd_resnet1202"}  # the thousand-layer builds: resnet110 and sd_resnet110 run their code fast
CIFAR = {n for n in MODELS if n.startswith(("resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                                            "resnet1202", "resnext29", "sd_resnet110", "sd_resnet1202"))}


def _randomize_bn(m: nn.Module, gen: torch.Generator) -> None:
    """BN at init is (nearly) the identity; give it statistics and affine parameters that matter."""
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.randn(mod.num_features, generator=gen) * 0.1)


# ---------------------------------------------------------------------------------------------- registry
def test_every_model_of_the_issue_is_registered():
    assert set(MODELS) <= set(list_models())
    assert set(list_models("resnet*")) | set(list_models("resnext*")) | set(list_models("sd_resnet*")) >= set(MODELS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in MODELS])
def test_create_defaults_to_the_papers_class_count(name):
    m = build_meta(name)
    expected = 10 if name in CIFAR else 1000
    assert m.num_classes == expected == m.fc.out_features == m.default_cfg["num_classes"]
    assert m.default_cfg["input_size"] == ((3, 32, 32) if name in CIFAR else (3, 224, 224))
    assert m.default_cfg["dataset"] == ("cifar10" if name in CIFAR else "imagenet")


# ----------------------------------------------------------------------------------- params and MACs
def test_cifar100_adds_90_times_classifier_input_plus_one():
    assert n_params(build_meta("resnet110", num_classes=100)) == PARAMS["resnet110"] + 90 * 65
    assert n_params(build_meta("resnext29_8x64d", num_classes=100)) == PARAMS["resnext29_8x64d"] + 90 * 1025
    assert build_meta("sd_resnet110", num_classes=100).default_cfg["dataset"] == "cifar100"


@pytest.mark.parametrize("name", sorted(GMACS_V15))
def test_v15_layout_macs_match_torchvision(name):
    ours = build_meta(name, stride_in_1x1=False)
    ours_macs = macs(ours, 224)
    assert ours_macs / 1e9 == pytest.approx(GMACS_V15[name], rel=0.01)
    with torch.device("meta"), MetaShapes():
        tv = getattr(torchvision.models, name)()
    assert ours_macs == macs(tv, 224)
    assert n_params(ours) == PARAMS[name]  # same params, more MACs


def test_stride_placement_v1_puts_the_stride_in_the_first_1x1():
    v1, v15 = build_meta("resnet50"), build_meta("resnet50", stride_in_1x1=False)
    b1, b15 = v1.layer2[0], v15.layer2[0]
    assert (b1.conv1.stride, b1.conv2.stride) == ((2, 2), (1, 1))
    assert (b15.conv1.stride, b15.conv2.stride) == ((1, 1), (2, 2))
    rx = build_meta("resnext50_32x4d").layer3[0]  # ResNeXt: stride in the grouped 3x3 by default
    assert (rx.conv1.stride, rx.conv2.stride, rx.conv2.groups) == ((1, 1), (2, 2), 32)


def test_cifar_resnet_option_a_shortcut_has_no_parameters_and_zero_pads():
    m = create("resnet20")
    sc = m.layer2[0].downsample
    assert isinstance(sc, ZeroPadShortcut) and not list(sc.parameters())
    x = torch.randn(2, 16, 32, 32)
    y = sc(x)
    assert y.shape == (2, 32, 16, 16)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, 16:]) == 0
    # stochastic depth's code averages 2x2 windows instead of subsampling
    sd = create("sd_resnet110").layer3[0].downsample
    torch.testing.assert_close(sd(torch.ones(1, 32, 4, 4).cumsum(-1))[:, :32],
                               torch.nn.functional.avg_pool2d(torch.ones(1, 32, 4, 4).cumsum(-1), 2))
    assert all(b.conv1.bias is not None for b in create("sd_resnet110").residual_blocks())


# ------------------------------------------------------------------------------ forward / backward
# Real passes at the CIFAR models' native 32 and the ImageNet models' small 64 in the fast suite, through the
# same modules as at 224 (slow; the shapes at 224 are checked on the meta device in test_model_api.py).
FORWARD_BACKWARD = [pytest.param(n, side, marks=[pytest.mark.slow] if n in SLOW or side == 224 else [],
                                 id=f"{n}-{side}") for n in MODELS for side in ((32,) if n in CIFAR else (64, 224))]


@pytest.mark.parametrize("name, side", FORWARD_BACKWARD)
def test_forward_backward(name, side):
    m = create(name).train()
    x = torch.randn(2, m.in_chans, side, side)
    y = m(x)
    assert y.shape == (2, m.num_classes) and torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in m.parameters()]
    # stochastic depth may drop blocks (their parameters get no gradient); the stem and classifier never
    assert m.conv1.weight.grad is not None and m.fc.weight.grad.abs().sum() > 0
    if not name.startswith("sd_"):
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["resnet20", "resnext29_8x64d", "sd_resnet110", "resnet18"])
def test_uniform_api(name):
    torch.manual_seed(0)
    m = create(name).eval()
    size = m.default_cfg["input_size"][1]
    x = torch.randn(2, 3, size, size)
    feats = m.forward_features(x)
    assert feats.shape[1] == m.num_features and m.in_chans == 3
    torch.testing.assert_close(m.forward_head(feats), m(x))
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)  # eval is deterministic


def test_zero_init_residual_makes_each_block_start_as_its_shortcut():
    torch.manual_seed(0)
    m = create("resnet50", zero_init_residual=True).eval()
    blk = m.layer1[1]
    x = torch.relu(torch.randn(2, 256, 8, 8))
    torch.testing.assert_close(blk(x), x)
    assert all(b.bn3.weight.abs().sum() == 0 for b in m.residual_blocks())
    assert all(b.bn2.weight.abs().sum() == 0 for b in create("resnet20", zero_init_residual=True).residual_blocks())


def test_in_chans_and_clear_errors():
    m = create("resnet20", in_chans=1)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*in_chans=3"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="one positive entry per stage"):
        ResNet(layers=(2, 2), widths=(64, 128, 256))
    with pytest.raises(ValueError, match="block must be one of"):
        ResNet(block="preact")
    with pytest.raises(ValueError, match="cardinality/base_width need block='bottleneck'"):
        ResNet(block="basic", layers=(2, 2, 2, 2), cardinality=32)
    with pytest.raises(ValueError, match="cannot shrink"):
        ZeroPadShortcut(64, 32)
    with pytest.raises(ValueError, match=r"p_L .* must be in \(0, 1\]"):
        create("sd_resnet110", p_L=0.0)
    with pytest.raises(ValueError, match="Closest registered names: resnet110"):
        create("resnet111")


# -------------------------------------------------------------------------------- stochastic depth
def test_survival_probabilities_decay_linearly_to_p_L():
    m = build_meta("sd_resnet110")
    probs = [b.survival_prob for b in m.residual_blocks()]
    assert len(probs) == 54
    L = 54
    assert probs == pytest.approx([1 - l / L * 0.5 for l in range(1, L + 1)])
    assert probs[-1] == pytest.approx(0.5) and probs[0] == pytest.approx(1 - 0.5 / 54)
    assert survival_probabilities(4, 0.8, "uniform") == [0.8] * 4
    assert len(build_meta("sd_resnet152").residual_blocks()) == 50
    assert all(b.survival_prob == 1.0 for b in build_meta("resnet110").residual_blocks())
    m.set_stochastic_depth(0.8, "uniform")
    assert [b.survival_prob for b in m.residual_blocks()] == [0.8] * 54


def _block(survival_prob: float) -> BasicBlock:
    torch.manual_seed(1)
    blk = BasicBlock(8, 8, survival_prob=survival_prob)
    gen = torch.Generator().manual_seed(2)
    _randomize_bn(blk, gen)
    return blk


def test_stochastic_depth_eval_scales_the_branch_by_its_survival_probability():
    blk = _block(0.7).eval()
    x = torch.randn(2, 8, 6, 6)
    branch = torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(
            torch.relu(torch.nn.functional.batch_norm(
                torch.nn.functional.conv2d(x, blk.conv1.weight, padding=1), blk.bn1.running_mean,
                blk.bn1.running_var, blk.bn1.weight, blk.bn1.bias, eps=blk.bn1.eps)),
            blk.conv2.weight, padding=1),
        blk.bn2.running_mean, blk.bn2.running_var, blk.bn2.weight, blk.bn2.bias, eps=blk.bn2.eps)
    expected = torch.relu(x + 0.7 * branch)
    torch.testing.assert_close(blk(x), expected)
    torch.testing.assert_close(blk(x), blk(x), rtol=0, atol=0)  # no randomness in eval
    assert not torch.allclose(blk(x), torch.relu(x + branch))  # the scaling is really applied


def test_stochastic_depth_gate_acts_only_in_training_one_draw_per_mini_batch():
    blk = _block(0.5).train()
    x = torch.randn(4, 8, 6, 6)
    dropped = torch.relu(x)
    with torch.no_grad():
        full = torch.relu(x + blk.residual(x))
    torch.manual_seed(123)
    outs = [blk(x) for _ in range(200)]
    n_dropped = sum(torch.equal(o, dropped) for o in outs)
    n_kept = sum(torch.allclose(o, full) for o in outs)
    assert n_dropped + n_kept == 200  # the whole mini-batch shares one gate: all-or-nothing
    assert 60 < n_dropped < 140  # Binomial(200, 0.5): far outside would mean a wrong probability
    # a dropped block leaves its BN statistics untouched (its branch never runs)
    blk2 = _block(0.5).train()
    mean_before = blk2.bn1.running_mean.clone()
    torch.manual_seed(0)
    while not torch.equal(blk2(x), dropped):
        mean_before = blk2.bn1.running_mean.clone()
    torch.testing.assert_close(blk2.bn1.running_mean, mean_before, rtol=0, atol=0)


def test_stochastic_depth_model_differs_between_seeds_only_in_training():
    m = create("sd_resnet110", layers=(3, 3, 3))
    x = torch.randn(2, 3, 32, 32)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    torch.manual_seed(0)
    c = m(x)
    assert not torch.allclose(a, b)  # different gates (train-mode BN is the same for both)
    torch.testing.assert_close(a, c, rtol=0, atol=0)  # the gates follow the seed
    plain = create("sd_resnet110", layers=(3, 3, 3), p_L=1.0).train()
    plain.load_state_dict(m.state_dict())
    torch.manual_seed(1)
    p1 = plain(x)
    torch.manual_seed(2)
    torch.testing.assert_close(p1, plain(x), rtol=0, atol=0)  # p_L = 1: no stochastic depth
    m.eval()
    torch.manual_seed(0)
    e1 = m(x)
    torch.manual_seed(1)
    torch.testing.assert_close(e1, m(x), rtol=0, atol=0)


# -------------------------------------------------------------------------- compile and autocast
def test_resnet20_compiles_without_graph_breaks():
    # aot_eager: dynamo capture (fullgraph: no graph break) and AOTAutograd's backward, without
    # inductor's code generation, which takes minutes on a shared CPU (the slow test below does it).
    m = create("resnet20").train()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = cm(x)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert m.fc.weight.grad is not None


@pytest.mark.slow
def test_resnet20_and_stochastic_depth_run_under_inductor():
    import torch._inductor.config as inductor_config

    x = torch.randn(2, 3, 32, 32)
    m = create("resnet20").eval()
    torch.testing.assert_close(torch.compile(m)(x), m(x), rtol=1e-4, atol=1e-4)
    sd = create("sd_resnet110", layers=(3, 3, 3), p_L=0.2).train()
    with inductor_config.patch(fallback_random=True):  # eager's RNG stream, so the gates agree
        csd = torch.compile(sd, fullgraph=True)
        for seed in range(3):
            torch.manual_seed(seed)
            ref = sd(x)
            torch.manual_seed(seed)
            torch.testing.assert_close(csd(x), ref, rtol=1e-4, atol=1e-4)
    csd(x).sum().backward()


def test_stochastic_depth_compiles_without_graph_breaks_and_follows_the_same_gates():
    sd = create("sd_resnet110", layers=(2, 2, 2), p_L=0.2).train()
    x = torch.randn(2, 3, 32, 32)
    csd = torch.compile(sd, backend="aot_eager", fullgraph=True)
    outs = set()
    for seed in range(3):
        torch.manual_seed(seed)
        ref = sd(x)
        torch.manual_seed(seed)
        y = csd(x)
        torch.testing.assert_close(y, ref)
        outs.add(round(float(y.detach().sum()), 4))
    assert len(outs) > 1  # the gates did change between seeds


@pytest.mark.parametrize("name", ["resnet20", "resnext29_8x64d", "sd_resnet110"])
def test_autocast_bfloat16_on_cpu(name):
    m = create(name, **({"layers": (1, 1, 1)} if name != "resnet20" else {})).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: compare relative to the logits' scale
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x).float().logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(m.fc.weight.grad).all()


# ------------------------------------------------------------------------ torchvision weight import
TV_IMPORT = [("resnet18", "resnet18"), ("resnet50", "resnet50"), ("resnext50_32x4d", "resnext50_32x4d"),
             pytest.param("resnet34", "resnet34", marks=pytest.mark.slow),
             pytest.param("resnet101", "resnet101", marks=pytest.mark.slow),
             pytest.param("resnet152", "resnet152", marks=pytest.mark.slow),
             pytest.param("resnext101_32x8d", "resnext101_32x8d", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,tv_name", TV_IMPORT)
def test_torchvision_import_gives_equal_outputs(name, tv_name):
    assert ("torchvision", name) in TWINS
    torch.manual_seed(0)
    tv = getattr(torchvision.models, tv_name)(weights=None)
    _randomize_bn(tv, torch.Generator().manual_seed(0))
    tv.eval()
    ours = from_torchvision(name, tv.state_dict()).eval()
    assert list(ours.state_dict()) == list(tv.state_dict())  # torchvision's keys, unrenamed
    x = torch.randn(2, 3, 64, 64)  # any size works for these nets; 64 keeps the test fast
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-5)
    assert n_params(ours) == n_params(tv)


@pytest.mark.slow
def test_torchvision_resnet152_loads_into_sd_resnet152_only_without_stochastic_depth():
    torch.manual_seed(0)
    tv = torchvision.models.resnet152(weights=None)
    _randomize_bn(tv, torch.Generator().manual_seed(0))
    tv.eval()
    with pytest.raises(ValueError, match="survival probability.*p_L=1.0"):
        from_torchvision("sd_resnet152", tv)
    ours = from_torchvision("sd_resnet152", tv, p_L=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-4, atol=1e-5)


def test_torchvision_import_refuses_the_v1_layout_and_other_architectures():
    tv_sd = torchvision.models.resnet50(weights=None).state_dict()
    with pytest.raises(ValueError, match="stride_in_1x1 must be False"):
        from_torchvision("resnet50", tv_sd, stride_in_1x1=True)  # same shapes, different network
    with pytest.raises(ValueError, match="stem must be 'imagenet'.*shortcut must be 'B'"):
        from_torchvision("resnet50", tv_sd, stem="cifar", shortcut="A")
    with pytest.raises(ValueError, match="missing .*unexpected"):
        from_torchvision("resnet101", tv_sd)
    with pytest.raises(ValueError, match="no torchvision twin"):
        from_torchvision("resnet20", tv_sd)


def test_torchvision_import_for_another_class_count_keeps_our_classifier():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(ValueError, match="num_classes=1000 or pass load_classifier=False"):
        from_torchvision("resnet18", tv, num_classes=10)
    torch.manual_seed(1)
    fc_fresh = create("resnet18", num_classes=10).fc.weight
    torch.manual_seed(1)
    ours = from_torchvision("resnet18", tv, num_classes=10, load_classifier=False).eval()
    x = torch.randn(2, 3, 64, 64)
    tv.fc = nn.Identity()
    torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True), tv(x))
    torch.testing.assert_close(ours.fc.weight, fc_fresh, rtol=0, atol=0)


def test_torchvision_import_strips_a_data_parallel_prefix():
    tv = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    ours = from_torchvision("resnet18", {"module." + k: v for k, v in tv.state_dict().items()}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- paper fidelity
def _he_std(conv: nn.Conv2d, mode: str) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    fan = k * (conv.in_channels // conv.groups if mode == "fan_in" else conv.out_channels)
    return (2.0 / fan) ** 0.5


@pytest.mark.parametrize("name, mode", [("resnet50", "fan_out"), ("resnext29_8x64d", "fan_out"),
                                        ("sd_resnet110", "fan_in"), ("sd_resnet152", "fan_out")])
def test_he_init_uses_the_authors_fan(name, mode):
    """fb.resnet.torch and the ResNeXt code divide by k*k*out; stochastic depth's CIFAR code (nninit.kaiming)
    by k*k*in. Every conv with enough weights whose fans differ by 2x or more tells the two apart."""
    torch.manual_seed(0)
    m = create(name, layers=(1, 1, 1) if "29" in name or "110" in name else (1, 1, 1, 1))
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.weight.numel() > 4_000
             and abs(_he_std(c, "fan_in") / _he_std(c, "fan_out") - 1) > 0.4]
    assert convs
    for c in convs:
        assert c.weight.std().item() == pytest.approx(_he_std(c, mode), rel=0.05)
    assert all(c.bias is None or torch.count_nonzero(c.bias) == 0 for c in m.modules() if isinstance(c, nn.Conv2d))


def test_init_he_fan_modes_differ_as_the_formula_says():
    conv = nn.Conv2d(16, 256, 3)
    for mode in ("fan_in", "fan_out"):
        torch.manual_seed(0)
        init_he_(conv, mode)
        assert conv.weight.std().item() == pytest.approx(_he_std(conv, mode), rel=0.03)


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_option_a_shortcuts_for_resnet18_34_as_in_table2(name):
    """The paper's Table 2 ResNet-18/34: zero-padding shortcuts, so B's three projections (1x1 conv + BN at
    the starts of stages 2-4) are missing from the count; same outputs' shape, same MACs up to the 1x1s."""
    a, b = build_meta(name, shortcut="A"), build_meta(name)
    projections = sum(c_in * c_out + 2 * c_out for c_in, c_out in ((64, 128), (128, 256), (256, 512)))
    assert n_params(b) == PARAMS[name]
    assert n_params(a) == PARAMS[name] - projections
    assert all(isinstance(blk.downsample, (ZeroPadShortcut, type(None))) for blk in a.residual_blocks())
    x = torch.randn(2, 3, 64, 64)
    assert create(name, shortcut="A")(x).shape == (2, 1000)
