"""Inception-v4, Inception-ResNet-v1/v2 (Szegedy et al. 2016): counts, module widths, residual scaling, timm
weight import, compile and autocast.

Counts and shapes are taken on the meta device; forward passes run on the CPU at 75x75 (the smallest
input the valid-padded stems and reductions take), and forward + backward also at the native 299x299.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch
from torch import nn

from lightcnn.models import create, list_models
from lightcnn.models.inception_resnet import InceptionResNet, InceptionResNetBlock
from lightcnn.models.weights import from_timm, map_layers_in_order, register_twin, twins
from lightcnn.published import published
from tests.helpers import MetaShapes, bf16_autocast_error, build_experiment, build_meta, n_params, randomise_bn

INCEPTION = ["inception_v4", "inception_resnet_v1", "inception_resnet_v2", "inception_resnet_v2_paper"]
SMALL = 75  # 75 -> 35 -> 33 -> 16 (stem) -> 7 (Reduction-A) -> 3 (Reduction-B)
# trunk widths at 35x35, 17x17 and 8x8 (the figures; TF-slim for the released v2), and the features' width
WIDTHS = {
    "inception_v4": ((384, 1024, 1536), 1536),
    "inception_resnet_v1": ((256, 896, 1792), 1792),
    "inception_resnet_v2_paper": ((384, 1152, 2144), 2144),
    "inception_resnet_v2": ((320, 1088, 2080), 1536),
}


def test_every_inception_model_is_registered():
    assert set(INCEPTION) <= set(list_models())


@pytest.mark.parametrize("name", INCEPTION)
def test_default_cfg_is_imagenet_at_299(name):
    cfg = build_meta(name).default_cfg
    assert cfg["input_size"] == (3, 299, 299) and cfg["dataset"] == "imagenet" and cfg["num_classes"] == 1000
    assert cfg["mean"] == (0.5,) * 3 and cfg["std"] == (0.5,) * 3  # TF-slim scales inputs to [-1, 1]
    assert build_meta(name, num_classes=7).Logits.out_features == 7


@pytest.mark.parametrize("name", ["inception_v4", "inception_resnet_v2"])
def test_released_layout_has_timms_parameter_count(name):
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    assert n_params(build_meta(name)) == n_params(reference)


# ----------------------------------------------------------------------------------------------- layout

def stage_widths(model: nn.Module, side: int = 299) -> dict[int, int]:
    """Map side -> channels of the last module's output at that side (35, 17, 8 at 299), not counting the
    released v2's final 1x1 convolution."""
    widths = {}
    hooks = [m.register_forward_hook(lambda m, i, o: widths.__setitem__(o.shape[-1], o.shape[1]))
             for name, m in model.features.named_children() if name != "Conv2d_7b_1x1"]
    with MetaShapes():
        model.eval().forward_features(torch.zeros(1, 3, side, side, device="meta"))
    for h in hooks:
        h.remove()
    return widths


@pytest.mark.parametrize("name", INCEPTION)
def test_trunk_widths_follow_the_figures(name):
    model = build_meta(name)
    (w35, w17, w8), features = WIDTHS[name]
    widths = stage_widths(model)
    assert (widths[35], widths[17], widths[8]) == (w35, w17, w8)
    assert model.num_features == features
    assert model.forward_features(torch.zeros(1, 3, 299, 299, device="meta")).shape == (1, features, 8, 8)


def test_inception_v4_module_counts_follow_fig9():
    names = list(build_meta("inception_v4").features._modules)
    assert names == ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Mixed_3a", "Mixed_4a", "Mixed_5a",
                     "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_5e", "Mixed_6a", *[f"Mixed_6{c}" for c in "bcdefgh"],
                     "Mixed_7a", "Mixed_7b", "Mixed_7c", "Mixed_7d"]


@pytest.mark.parametrize("name, counts, scales, linear_last", [
    ("inception_resnet_v2", (10, 20, 10), (0.17, 0.10, 0.20), True),
    ("inception_resnet_v2_paper", (5, 10, 5), (0.17, 0.10, 0.20), False),
    ("inception_resnet_v1", (5, 10, 5), (0.17, 0.10, 0.20), False),
])
def test_residual_modules_scale_and_match_dimensions(name, counts, scales, linear_last):
    model = build_meta(name)
    blocks = [m for m in model.modules() if isinstance(m, InceptionResNetBlock)]
    assert len(blocks) == sum(counts)
    expected = [scales[0]] * counts[0] + [scales[1]] * counts[1] + [scales[2]] * counts[2]
    if linear_last:  # TF-slim's final Block8: scale 1, no ReLU
        expected[-1] = 1.0
    assert [b.scale for b in blocks] == expected
    assert [isinstance(b.relu, nn.ReLU) for b in blocks] == [True] * (sum(counts) - linear_last) + [False] * linear_last
    # the 1x1 convolution before each addition maps the branches' concatenation back to the trunk's width
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append((i[0].shape, o.shape, m.Conv2d_1x1.in_channels,
                                                                      sum(m._modules[f"Branch_{j}"][-1].out_channels
                                                                          for j in range(m.num_branches)))))
             for b in blocks]
    model.eval()(torch.zeros(1, 3, 299, 299, device="meta"))
    for h in hooks:
        h.remove()
    assert len(shapes) == len(blocks)
    assert all(i == o and concat == width for i, o, width, concat in shapes)
    assert all(b.Conv2d_1x1.bias is not None for b in blocks)  # "1x1 Conv (Linear)": bias, no BN


def test_residual_module_computes_scaled_sum_then_relu():
    block = [m for m in create("inception_resnet_v1", num_blocks=(1, 1, 1)).modules()
             if isinstance(m, InceptionResNetBlock)][0].eval()
    randomise_bn(block)
    x = torch.randn(2, 256, 9, 9)
    with torch.no_grad():
        up = torch.cat([block.Branch_0(x), block.Branch_1(x), block.Branch_2(x)], 1)
        expected = torch.relu(x + 0.17 * nn.functional.conv2d(up, block.Conv2d_1x1.weight, block.Conv2d_1x1.bias))
        torch.testing.assert_close(block(x), expected)


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="block_b needs 4 numbers"):
        create("inception_resnet_v1", block_b=(1, 2, 3))
    with pytest.raises(ValueError, match="stem must be one of"):
        InceptionResNet(stem="resnet")
    with pytest.raises(ValueError, match="num_blocks needs 3 counts"):
        create("inception_v4", num_blocks=(4, 7))


# ------------------------------------------------------------------------------------ forward and backward

@functools.cache
def _built(name: str) -> nn.Module:
    """One full build per model for the tests that only run it (each sets train/eval mode itself)."""
    return create(name)


def _forward_backward(name: str, side: int) -> None:
    model = _built(name).train()
    model.zero_grad(set_to_none=True)
    out = model(torch.randn(2, 3, side, side))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("name", INCEPTION)
def test_forward_backward_small_input(name):
    _forward_backward(name, SMALL)


# The native size's shapes are checked on the meta device for every model (test_model_api.py); the real
# forward and backward run fast at the small input above, with the same modules.
@pytest.mark.slow
@pytest.mark.parametrize("name", INCEPTION)
def test_forward_backward_at_native_size(name):
    _forward_backward(name, 299)


@pytest.mark.parametrize("name", INCEPTION)
def test_dropout_only_in_training_and_eval_is_deterministic(name):
    model = create(name, num_blocks=(1, 1, 1))
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        y = model.eval()(x)
        assert torch.equal(y, model(x))
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), y)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
        model.train()
        model.dropout.p = 0.0
        base = model(x)
        model.dropout.p = 0.2  # the paper's keep 0.8
        assert not torch.allclose(model(x), base)
    assert build_meta(name).dropout.p == 0.2


# ------------------------------------------------------------------------------------------ timm weights

@pytest.mark.parametrize("name", ["inception_v4", "inception_resnet_v2"])
def test_timm_weights_give_equal_outputs(name):
    reference = timm.create_model(name, pretrained=False, num_classes=10).eval()
    randomise_bn(reference)  # so that a BN mapped onto the wrong layer, or left at its defaults, shows
    ours = from_timm(name, reference).eval()
    assert ours.num_classes == 10
    x = torch.randn(2, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_weights_with_a_fresh_classifier_for_fine_tuning():
    reference = timm.create_model("inception_resnet_v2", pretrained=False).eval()
    randomise_bn(reference)
    ours = from_timm("inception_resnet_v2", reference, num_classes=7, load_classifier=False).eval()
    assert ours.Logits.out_features == 7
    x = torch.randn(1, 3, SMALL, SMALL)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), rtol=1e-5, atol=1e-5)


def test_timm_import_refuses_what_does_not_fit():
    assert {"inception_v4", "inception_resnet_v2"} <= set(twins("timm"))
    with torch.device("meta"):
        v4 = timm.create_model("inception_v4", pretrained=False).state_dict()
    with pytest.raises(ValueError, match="no timm twin.*inception_resnet_v2"):
        from_timm("inception_resnet_v1", v4)
    with pytest.raises(ValueError, match="parametrised layers"):
        map_layers_in_order(build_meta("inception_v4", num_blocks=(3, 7, 3)), v4)
    with pytest.raises(ValueError, match="num_classes=1000 or pass load_classifier=False"):
        from_timm("inception_v4", v4, num_classes=10)
    with pytest.raises(TypeError, match="nn.Module or its state_dict"):
        from_timm("inception_v4", 3)
    with pytest.raises(ValueError, match="registered twice"):
        register_twin("timm", "inception_v4", map_layers_in_order)


# ------------------------------------------------------------------------------------ compile and autocast

@pytest.mark.parametrize("name", ["inception_v4", "inception_resnet_v2"])
def test_runs_under_torch_compile(name):
    # dynamo + AOT autograd on one module of each kind at 75x75 (inductor's C++ code generation for the
    # whole network takes minutes on 2 shared CPU cores: the slow twin below)
    _compiled_matches_eager(name, backend="aot_eager", num_blocks=(1, 1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", INCEPTION)
def test_runs_under_torch_compile_inductor(name):
    # float64: at 75x75 the 8x8 stage is 1x1, so training-mode BN normalises over 2 values per channel, and
    # inductor's float32 reassociation moves some gradients by ~5e-4 through that ill-conditioned step
    _compiled_matches_eager(name, backend="inductor", dtype=torch.float64)


def _compiled_matches_eager(name: str, backend: str, dtype: torch.dtype = torch.float32, **kw) -> None:
    model = create(name, drop_rate=0.0, **kw).to(dtype).train()
    x = torch.randn(2, 3, SMALL, SMALL, dtype=dtype)
    compiled = torch.compile(model, backend=backend)
    out_c, out_e = compiled(x), model(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    grads_e = torch.autograd.grad(out_e.logsumexp(-1).sum(), list(model.parameters()))
    grads_c = torch.autograd.grad(out_c.logsumexp(-1).sum(), list(model.parameters()))
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", INCEPTION)
def test_bfloat16_autocast(name):
    # bfloat16 keeps 8 bits (about 0.4% per rounding); the classic models' bound is 3%
    assert bf16_autocast_error(_built(name), torch.randn(2, 3, SMALL, SMALL)) < 0.03


@pytest.mark.parametrize("recipe", ["inception_v4_imagenet", "inception_resnet_v2_imagenet"])
def test_recipe_is_the_papers(recipe, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])
    cli = build_experiment(recipe, tmp_path)
    cfg = cli.model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    # Sec. 4: RMSProp with decay 0.9 and epsilon 1.0, lr 0.045 decayed by 0.94 every two epochs
    assert isinstance(opt, torch.optim.RMSprop)
    group = opt.param_groups[0]
    assert (group["lr"], group["alpha"], group["eps"]) == (0.045, 0.9, 1.0)
    assert (sched.step_size, sched.gamma) == (2, 0.94) and cfg["lr_scheduler"].get("interval", "epoch") == "epoch"
    assert cli.datamodule.image_size == 299
    assert any(isinstance(cb, EMAWeightAveraging) for cb in cli.trainer.callbacks)  # "running average"


# --- initialisation: TF-slim's ---------------------------------------------------------------------------

def _truncated_std_factor(a: float = 2.0) -> float:
    """std of a unit normal truncated to [-a, a]."""
    import math

    pdf, mass = math.exp(-a * a / 2) / math.sqrt(2 * math.pi), math.erf(a / math.sqrt(2))
    return math.sqrt(1 - 2 * a * pdf / mass)


@pytest.mark.parametrize("name, conv_init", [
    ("inception_v4", "variance_scaling"), ("inception_resnet_v1", "variance_scaling"),
    ("inception_resnet_v2_paper", "variance_scaling"), ("inception_resnet_v2", "xavier")])
def test_init_is_tf_slims_per_layer_type(name, conv_init):
    """inception_utils' variance_scaling_initializer(): N(0, sqrt(2.6 / fan_in)) truncated at 2 std (draws'
    std sqrt(2.6 * 0.774 / fan_in) ~ He); the released Inception-ResNet-v2's arg scope leaves slim.conv2d's
    Glorot uniform. Both: zero biases (the BN-free residual 1x1s), BN at 1/0, Glorot-uniform logits."""
    import math

    torch.manual_seed(0)
    model = create(name, num_blocks=(1, 1, 1))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    residual = [m.Conv2d_1x1 for m in model.modules() if isinstance(m, InceptionResNetBlock)]
    assert len(residual) == (0 if name == "inception_v4" else 3) and all(c.bias is not None for c in residual)
    pooled = []
    for conv in convs:
        w = conv.weight.detach().double()
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        if conv_init == "variance_scaling":
            bound = 2 * math.sqrt(2.6 / fan_in)
            std = math.sqrt(2.6 / fan_in) * _truncated_std_factor()
        else:
            bound = math.sqrt(6 / (fan_in + fan_out))
            std = bound / math.sqrt(3)
        assert w.abs().max() <= bound + 1e-7
        assert abs(w.mean()) < 5 * std / math.sqrt(w.numel())
        if w.numel() >= 20_000:
            assert w.std() == pytest.approx(std, rel=0.05), conv
        pooled.append((w / std).flatten())
        if conv.bias is not None:
            assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert torch.cat(pooled).std() == pytest.approx(1.0, rel=0.005)
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) and torch.equal(b.bias, torch.zeros_like(b.bias))
               for b in model.modules() if isinstance(b, nn.BatchNorm2d))
    logits = model.Logits.weight.detach().double()
    bound = math.sqrt(6 / sum(logits.shape))
    assert logits.abs().max() <= bound and logits.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert torch.equal(model.Logits.bias, torch.zeros(1000))


def test_init_knob_keeps_pytorch_defaults_and_refuses_unknown_names():
    torch.manual_seed(0)
    model = create("inception_resnet_v1", num_blocks=(1, 1, 1), weight_init="pytorch")
    conv = model.features.Repeat.block35_1.Conv2d_1x1
    assert conv.bias.abs().max() > 0  # PyTorch's default bias init, untouched
    assert conv.weight.std().item() == pytest.approx(1 / (3 * conv.weight[0].numel()) ** 0.5, rel=0.05)
    with pytest.raises(TypeError, match="weight_init"):
        create("inception_v4", num_blocks=(1, 1, 1), weight_init="he")
    from lightcnn.models.inception_v4 import init_tf_slim_
    with pytest.raises(ValueError, match="weight_init must be"):
        init_tf_slim_(model, "he")


# --- TF-slim's training setup: auxiliary head, BN decay and scale -----------------------------------------

@pytest.mark.parametrize("name, grid_width", [("inception_v4", 1024), ("inception_resnet_v2", 1088)])
def test_tf_slim_aux_head_on_the_17x17_grid(name, grid_width):
    """AuxLogits: 5x5/3 valid avg-pool (17 -> 5), 1x1 conv-BN 128, 5x5 conv-BN 768, linear; counted by formula.
    Training mode returns (logits, aux_logits); eval the logits alone; off by default (timm's layout)."""
    model = build_meta(name, aux_logits=True)
    head = 128 * grid_width + 2 * 128 + 768 * 128 * 25 + 2 * 768 + 768 * 1000 + 1000
    assert n_params(model) - published(name).params == head
    assert model.AuxLogits.Conv2d_2a.conv.kernel_size == (5, 5)
    assert build_meta(name).AuxLogits is None


@pytest.mark.slow  # ~3-10 s: a 139x139 forward on the shared CPUs
def test_aux_head_reads_the_input_of_mixed_7a_in_training_only():
    torch.manual_seed(0)
    small = create("inception_resnet_v1", aux_logits=True, num_blocks=(1, 1, 1), input_size=139).train()
    seen = {}
    small.features.Mixed_7a.register_forward_hook(lambda m, inp, out: seen.update(grid=inp[0]))
    with torch.no_grad():
        out = small(torch.randn(2, 3, 139, 139))  # the smallest input with a 5x5 window on the 17x17 grid: 7x7
        assert out.logits.shape == out.aux_logits.shape == (2, 1000)
        torch.testing.assert_close(out.aux_logits, small.AuxLogits(seen["grid"]))
        assert isinstance(small.eval()(torch.randn(1, 3, 139, 139)), torch.Tensor)
    with pytest.raises(ValueError, match="aux_logits needs"):
        create("inception_resnet_v1", aux_logits=True, num_blocks=(1, 1, 1), input_size=75)


def test_bn_decay_and_scale_as_tf_slim():
    """bn_momentum 0.0003 = TF-slim's decay 0.9997; bn_scale=False keeps every gamma at 1, untrained."""
    model = build_meta("inception_resnet_v2", bn_momentum=0.0003, bn_scale=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {b.momentum for b in bns} == {0.0003} and not any(b.weight.requires_grad for b in bns)
    assert n_params(model) == published("inception_resnet_v2").params - sum(b.num_features for b in bns)
    assert list(model.state_dict()) == list(build_meta("inception_resnet_v2").state_dict())
