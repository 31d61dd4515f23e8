"""VGG 11/13/16/19 and their BatchNorm twins (Simonyan & Zisserman 2015): counts, named intermediate maps,
torchvision weights key for key, forward/backward and autocast.

Counts and state_dict shapes are taken on the meta device; everything else runs real tensors on the CPU.
VGG-13/16/19 and the _bn twins share VGG-11's code path: their forward/backward at 224 is marked slow.
"""
from __future__ import annotations

import pytest
import torch
import torchvision

from lightcnn.models import create, list_models
from lightcnn.models.weights import from_torchvision
from tests.helpers import (
    bf16_autocast_error,
    check_default_cfg,
    check_eval_is_features_then_head,
    check_forward_backward,
    check_published_counts,
    check_torchvision_state_dict_maps_key_for_key,
    check_torchvision_weights_give_equal_outputs,
    sides,
)

VGG = [f"vgg{depth}{bn}" for bn in ("", "_bn") for depth in (11, 13, 16, 19)]
# Forward + backward at 224, batch 2: 5-20 s each on 2 CPU cores
HEAVY = set(VGG) - {"vgg11"}


def test_every_vgg_model_is_registered():
    assert set(VGG) <= set(list_models())


@pytest.mark.parametrize("name", sorted(VGG))
def test_default_cfg_and_paper_class_count(name):
    check_default_cfg(name, num_classes=1000, dataset="imagenet", side=224)


@pytest.mark.parametrize("name", sorted(VGG))
def test_params_and_macs_match_reference(name):
    check_published_counts(name, 224)


@pytest.mark.parametrize("side", sides(64))
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in sorted(VGG)])
def test_forward_backward(name, side):
    check_forward_backward(name, num_classes=1000, side=side)


def test_eval_is_deterministic_and_equals_features_then_head():
    check_eval_is_features_then_head("vgg11_bn", 64)


def test_vgg_forward_intermediates_gives_named_maps():
    model = create("vgg16", num_classes=10, hidden_features=16).eval()  # the maps are the convolutions'
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, ["conv1_1", "relu1_1", "relu2_2", "relu3_3", "relu4_3", "pool5"])
        assert list(maps) == ["conv1_1", "relu1_1", "relu2_2", "relu3_3", "relu4_3", "pool5"]
        assert [tuple(m.shape[1:]) for m in maps.values()] == [
            (64, 64, 64), (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 8, 8), (512, 2, 2)]
        assert (maps["conv1_1"] < 0).any()  # taken before the in-place ReLU
        torch.testing.assert_close(maps["relu1_1"], maps["conv1_1"].clamp(min=0))
        torch.testing.assert_close(maps["pool5"], model.forward_features(x))
    with pytest.raises(ValueError, match="conv6_1"):
        model.forward_intermediates(x, ["conv6_1"])


def test_torchvision_weights_give_equal_outputs():
    check_torchvision_weights_give_equal_outputs("vgg11_bn")


@pytest.mark.parametrize("name", VGG)
def test_torchvision_state_dict_maps_key_for_key(name):
    check_torchvision_state_dict_maps_key_for_key(name)


def test_torchvision_import_refuses_what_does_not_fit():
    with torch.device("meta"):
        tv_vgg11_bn = torchvision.models.vgg11_bn()
    with pytest.raises(ValueError, match="BatchNorm"):
        from_torchvision("vgg11", tv_vgg11_bn)
    with pytest.raises(ValueError, match="num_classes=1000"):
        from_torchvision("vgg11_bn", tv_vgg11_bn, num_classes=10)


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn"])
def test_bfloat16_autocast(name):
    # bfloat16 keeps 8 bits: ~0.4% per rounding; a few percent after 10-20 layers of accumulation
    assert bf16_autocast_error(create(name), torch.randn(2, 3, 64, 64)) < 0.03
