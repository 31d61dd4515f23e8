"""AlexNet (Krizhevsky et al. 2012: `alexnet`, two towers with LRN; `alexnet_owt`, torchvision's one-tower
twin): counts, map sizes, towers and LRN, the paper's init, torchvision weights, compile and autocast.

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
from tests.conftest import DEVICES
from tests.helpers import (
    bf16_autocast_error,
    build_meta,
    check_compiled_matches_eager,
    check_default_cfg,
    check_eval_is_features_then_head,
    check_forward_backward,
    check_kernels_match_float64_reference,
    check_published_counts,
    check_torchvision_state_dict_maps_key_for_key,
    check_torchvision_weights_give_equal_outputs,
    feature_sides,
    sides,
)

ALEXNET = ["alexnet", "alexnet_owt"]
NATIVE_SIDE = {"alexnet": 227, "alexnet_owt": 224}


def test_every_alexnet_model_is_registered():
    assert set(ALEXNET) <= set(list_models())


@pytest.mark.parametrize("name", ALEXNET)
def test_default_cfg_and_paper_class_count(name):
    check_default_cfg(name, num_classes=1000, dataset="imagenet", side=NATIVE_SIDE[name])


@pytest.mark.parametrize("name", ALEXNET)
def test_params_and_macs_match_reference(name):
    check_published_counts(name, NATIVE_SIDE[name])


def test_alexnet_maps_are_55_27_13_6():
    assert feature_sides(build_meta("alexnet"), 227) == [55, 27, 27, 13, 13, 13, 13, 6]


def test_alexnet_towers_and_lrn_follow_the_paper():
    model = build_meta("alexnet")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]  # conv3 and the FC layers see both towers
    norms = [m for m in model.features if isinstance(m, LocalResponseNorm)]
    assert [(n.size, n.alpha, n.beta, n.k) for n in norms] == [(5, 5e-4, 0.75, 2.0)] * 2


def test_alexnet_paper_init():
    # section 5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers, 0 elsewhere
    model = create("alexnet")
    layers = {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert {n: m.bias.unique().tolist() for n, m in layers.items()} == {
        "conv1": [0.0], "conv2": [1.0], "conv3": [0.0], "conv4": [1.0], "conv5": [1.0],
        "fc6": [1.0], "fc7": [1.0], "fc8": [0.0]}
    assert all(abs(m.weight.std().item() - 0.01) < 1e-3 and abs(m.weight.mean().item()) < 1e-3
               for m in layers.values())


def test_alexnet_lrn_equals_the_papers_formula():
    # section 3.3: b = a / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, k=2, n=5, alpha=1e-4
    norm = [m for m in create("alexnet", init="pytorch").features if isinstance(m, LocalResponseNorm)][0]
    a = torch.randn(2, 12, 3, 3, dtype=torch.float64) * 10
    expected = torch.empty_like(a)
    for i in range(a.shape[1]):
        window = a[:, max(0, i - 2): min(a.shape[1], i + 3)]
        expected[:, i] = a[:, i] / (2 + 1e-4 * window.pow(2).sum(1)) ** 0.75
    torch.testing.assert_close(norm(a), expected)


@pytest.mark.parametrize("side", sides(67))
@pytest.mark.parametrize("name", ALEXNET)
def test_forward_backward(name, side):
    check_forward_backward(name, num_classes=1000, side=side)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_device_match_float64_reference_end_to_end(device):
    check_kernels_match_float64_reference("alexnet", 227, device, impl="kernel")


@pytest.mark.parametrize("name", ALEXNET)
def test_eval_is_deterministic_and_equals_features_then_head(name):
    check_eval_is_features_then_head(name, NATIVE_SIDE[name])


def test_torchvision_weights_give_equal_outputs():
    check_torchvision_weights_give_equal_outputs("alexnet_owt")


def test_torchvision_state_dict_maps_key_for_key():
    check_torchvision_state_dict_maps_key_for_key("alexnet_owt")


def test_torchvision_import_refuses_lrn_on_the_one_tower_twin():
    with torch.device("meta"):
        tv_alexnet = torchvision.models.alexnet()
    with pytest.raises(ValueError, match="alexnet_owt"):
        from_torchvision("alexnet_owt", tv_alexnet, lrn_after=(0, 1))


@pytest.mark.slow
def test_alexnet_runs_under_torch_compile():
    check_compiled_matches_eager("alexnet", 227, drop_rate=0.0)


@pytest.mark.parametrize("name", ALEXNET)
def test_bfloat16_autocast(name):
    # bfloat16 keeps 8 bits: ~0.4% per rounding; a few percent after 10-20 layers of accumulation
    assert bf16_autocast_error(create(name), torch.randn(2, 3, NATIVE_SIDE[name], NATIVE_SIDE[name])) < 0.03
