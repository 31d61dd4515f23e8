"""ZFNet (Zeiler & Fergus 2014: `zfnet`, Fig. 3's network; `zfnet_large`, Table 2's wider conv3-5): counts,
map sizes, pooling before normalising, filter renormalisation, forward/backward and autocast.

Counts and shapes are taken on the meta device; everything else runs real tensors on the CPU.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lightcnn.layers import LocalResponseNorm
from lightcnn.models import create, list_models
from lightcnn.models.weights import from_torchvision
from tests.helpers import (
    bf16_autocast_error,
    build_meta,
    check_default_cfg,
    check_eval_is_features_then_head,
    check_forward_backward,
    check_published_counts,
    feature_sides,
    macs,
    n_params,
    sides,
)

ZFNET = ["zfnet", "zfnet_large"]


def test_every_zfnet_model_is_registered():
    assert set(ZFNET) <= set(list_models())


@pytest.mark.parametrize("name", ZFNET)
def test_default_cfg_and_paper_class_count(name):
    check_default_cfg(name, num_classes=1000, dataset="imagenet", side=224)


@pytest.mark.parametrize("name", ZFNET)
def test_params_and_macs_match_reference(name):
    check_published_counts(name, 224)


def test_zfnet_large_counts_by_formula():
    # Zeiler & Fergus 2014, Table 2: Fig. 3's network with conv3-5 of 512, 1024 and 512 maps
    convs = [(3, 96, 7, 110), (96, 256, 5, 26), (256, 512, 3, 13), (512, 1024, 3, 13), (1024, 512, 3, 13)]
    fcs = [(512 * 6 * 6, 4096), (4096, 4096), (4096, 1000)]
    params = sum(ci * co * k * k + co for ci, co, k, _ in convs) + sum(i * o + o for i, o in fcs)
    mac = sum(ci * co * k * k * side**2 for ci, co, k, side in convs) + sum(i * o for i, o in fcs)
    model = build_meta("zfnet_large")
    assert n_params(model) == params == 107_627_624
    assert macs(model, 224) == mac
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [96, 256, 512, 1024, 512]
    assert feature_sides(model, 224) == [110, 55, 26, 13, 13, 13, 13, 6]  # Fig. 3's maps
    # otherwise Fig. 3's network: the same layers in the same order (pool, then normalise, in layers 1-2)
    zfnet = build_meta("zfnet")
    assert [c.out_channels for c in zfnet.features if isinstance(c, nn.Conv2d)] == [96, 256, 384, 384, 256]
    assert [(n, type(m)) for n, m in model.features.named_children()] == [
        (n, type(m)) for n, m in zfnet.features.named_children()]


def test_zfnet_maps_are_110_55_26_13_6():
    assert feature_sides(build_meta("zfnet"), 224) == [110, 55, 26, 13, 13, 13, 13, 6]


def test_zfnet_pools_before_normalising_on_55_and_13_maps():
    """ZFNet Sec. 2 / Fig. 3: layers 1-2 pool first, then normalise across feature maps (maps 55x55 and
    13x13 at 224); AlexNet normalises before pooling (55x55 and 27x27 at 227)."""
    def lrn_input_sides(model, side):
        sides = []
        hooks = [m.register_forward_pre_hook(lambda m, args: sides.append(args[0].shape[-1]))
                 for m in model.modules() if isinstance(m, LocalResponseNorm)]
        model.eval()(torch.zeros(1, 3, side, side, device="meta"))
        for h in hooks:
            h.remove()
        return sides

    assert lrn_input_sides(build_meta("zfnet"), 224) == [55, 13]
    assert lrn_input_sides(build_meta("alexnet"), 227) == [55, 27]
    order = [type(m).__name__ for m in build_meta("zfnet").features][:4]
    assert order == ["Conv2d", "ReLU", "MaxPool2d", "LocalResponseNorm"]


def test_zfnet_filter_renormalisation_caps_the_rms_at_the_radius():
    from lightcnn.models.zfnet import renormalize_filters_

    model = create("zfnet", init="pytorch")
    conv1 = model.features.conv1
    with torch.no_grad():
        conv1.weight.normal_(0.0, 0.01)
        conv1.weight[:3] *= 50  # RMS ~0.5 for the first three filters
    before = conv1.weight.clone()
    # PyTorch's default init leaves conv2-5 (fan-in >= 2400) far below 0.1: only conv1's three are rescaled
    others = {n: m.weight.clone() for n, m in model.features.named_children()
              if isinstance(m, nn.Conv2d) and n != "conv1"}
    assert renormalize_filters_(model) == 3
    rms = conv1.weight.pow(2).mean((1, 2, 3)).sqrt()
    assert rms[:3].tolist() == pytest.approx([0.1] * 3, rel=1e-5)
    assert torch.equal(conv1.weight[3:], before[3:])
    assert all(torch.equal(getattr(model.features, n).weight, w) for n, w in others.items())
    assert renormalize_filters_(model) == 0  # idempotent


def test_torchvision_import_refuses_zfnet():
    with torch.device("meta"):
        tv_alexnet = torchvision.models.alexnet()
    with pytest.raises(ValueError, match="no torchvision twin.*alexnet_owt.*vgg16"):
        from_torchvision("zfnet", tv_alexnet)


@pytest.mark.parametrize("side", sides(67))
@pytest.mark.parametrize("name", ZFNET)
def test_forward_backward(name, side):
    check_forward_backward(name, num_classes=1000, side=side)


def test_eval_is_deterministic_and_equals_features_then_head():
    check_eval_is_features_then_head("zfnet", 224)


@pytest.mark.parametrize("name", ZFNET)
def test_bfloat16_autocast(name):
    # bfloat16 keeps 8 bits: ~0.4% per rounding; a few percent after 10-20 layers of accumulation
    # at 67 x 67: the same layers and the same sums per output (the error grows with depth, not with the map)
    assert bf16_autocast_error(create(name), torch.randn(2, 3, 67, 67)) < 0.03
