"""GoogLeNet (Szegedy et al. 2015: `googlenet`, the paper's network with its two auxiliary heads;
`googlenet_naive`, the same network of Fig. 2(a)'s naive modules): counts (published, and by formula for the
naive one), Table 1's maps, the auxiliary heads, the Caffe init, compile and autocast.

Counts and shapes are taken on the meta device; everything else runs real tensors on the CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightcnn.models import create, list_models
from lightcnn.models.googlenet import GoogLeNetOutputs
from lightcnn.published import published
from tests.conftest import DEVICES
from tests.helpers import (
    bf16_autocast_error,
    build_meta,
    check_compiled_matches_eager,
    check_default_cfg,
    check_forward_backward,
    check_kernels_match_float64_reference,
    check_published_counts,
    feature_sides,
    macs,
    n_params,
)

GOOGLENET = ["googlenet", "googlenet_naive"]

# Table 1 of the GoogLeNet paper, written out again here so the naive network is counted independently
# of the model code: (name, n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj, map side).
TABLE1 = [
    ("3a", 64, 96, 128, 16, 32, 32, 28), ("3b", 128, 128, 192, 32, 96, 64, 28),
    ("4a", 192, 96, 208, 16, 48, 64, 14), ("4b", 160, 112, 224, 24, 64, 64, 14),
    ("4c", 128, 128, 256, 24, 64, 64, 14), ("4d", 112, 144, 288, 32, 64, 64, 14),
    ("4e", 256, 160, 320, 32, 128, 128, 14),
    ("5a", 256, 160, 320, 32, 128, 128, 7), ("5b", 384, 192, 384, 48, 128, 128, 7),
]


def naive_googlenet_counts(num_classes: int = 1000) -> tuple[int, int, int]:
    """(parameters without aux heads, aux-head parameters, MACs at 224) of GoogLeNet built from the naive
    module of Fig. 2(a), by formula: each module has 1x1, 3x3 and 5x5 convolutions on its whole input, and
    passes the (max-pooled) input on, so its output width is n1x1 + n3x3 + n5x5 + input width."""
    def conv(c_in, c_out, k):
        return c_out * c_in * k * k + c_out

    params = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3)
    mac = 64 * 3 * 49 * 112**2 + 64 * 64 * 56**2 + 192 * 64 * 9 * 56**2
    c, aux = 192, 0
    for name, n1, _, n3, _, n5, _, side in TABLE1:
        params += conv(c, n1, 1) + conv(c, n3, 3) + conv(c, n5, 5)
        mac += c * (n1 + 9 * n3 + 25 * n5) * side**2
        c = n1 + n3 + n5 + c
        if name in ("4a", "4d"):  # 1x1 conv to 128, FC 2048 -> 1024, FC 1024 -> classes
            aux += conv(c, 128, 1) + 2048 * 1024 + 1024 + 1024 * num_classes + num_classes
    params += c * num_classes + num_classes
    mac += c * num_classes
    return params, aux, mac



def test_every_googlenet_model_is_registered():
    assert set(GOOGLENET) <= set(list_models())


@pytest.mark.parametrize("name", GOOGLENET)
def test_default_cfg_and_paper_class_count(name):
    check_default_cfg(name, num_classes=1000, dataset="imagenet", side=224)


def test_params_and_macs_match_reference():
    check_published_counts("googlenet", 224)


def test_googlenet_without_aux_heads_has_published_count():
    assert n_params(build_meta("googlenet", aux_logits=False)) == published("googlenet").params


def test_googlenet_naive_counts_match_formula():
    # published.py gives no numbers for the naive network: the expected ones come from the formula above.
    params, aux, mac = naive_googlenet_counts()
    assert n_params(build_meta("googlenet_naive", aux_logits=False)) == params
    assert n_params(build_meta("googlenet_naive")) == params + aux
    assert macs(build_meta("googlenet_naive"), 224) == mac
    # what the 1x1 bottlenecks save: > 10x the parameters and > 7x the multiply-adds
    assert params > 10 * published("googlenet").params and mac > 7 * published("googlenet").gmacs * 1e9


def test_googlenet_maps_follow_table1():
    model = build_meta("googlenet")
    sides = feature_sides(model, 224, types=(nn.MaxPool2d,))
    # stem pools (56, 28), then the 3x3/1 pools inside the modules (28 x2, 14 x5, 7 x2) and pools 3, 4
    assert sides == [56, 28, 28, 28, 14, 14, 14, 14, 14, 14, 7, 7, 7]
    assert model.forward_features(torch.zeros(1, 3, 224, 224, device="meta")).shape == (1, 1024, 7, 7)


@pytest.mark.parametrize("name", ["googlenet", pytest.param("googlenet_naive", marks=pytest.mark.slow)])
def test_forward_backward_at_native_size(name):
    check_forward_backward(name, num_classes=1000)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_device_match_float64_reference_end_to_end(device):
    check_kernels_match_float64_reference("googlenet", 96, device, impl="kernel", aux_logits=False)


def test_googlenet_aux_heads_only_in_training():
    model = create("googlenet")
    x = torch.randn(1, 3, 224, 224)
    out = model.train()(x)
    assert isinstance(out, GoogLeNetOutputs) and out._fields == ("logits", "aux_logits2", "aux_logits1")
    assert all(o.shape == (1, 1000) for o in out)
    with torch.no_grad():
        y1, y2 = model.eval()(x), model(x)
    assert isinstance(y1, torch.Tensor) and y1.shape == (1, 1000)
    assert torch.equal(y1, y2)  # dropout off, no aux heads: deterministic
    # the eval logits are those of the training graph's main head with dropout off
    model.dropout.p = 0.0
    torch.testing.assert_close(model.train()(x).logits, y1)
    assert isinstance(create("googlenet", aux_logits=False).train()(x), torch.Tensor)


def test_googlenet_caffe_init_gives_aux_fc1024_bias_0_2():
    """BVLC train_val.prototxt: bias 0.2 in every conv and in loss1/fc, loss2/fc; 0 in the classifiers."""
    model = create("googlenet")
    for aux in model.aux.values():
        assert aux.fc1.bias.unique().tolist() == pytest.approx([0.2])
        assert aux.fc2.bias.unique().tolist() == [0.0]
        assert aux.conv.conv.bias.unique().tolist() == pytest.approx([0.2])
    assert model.fc.bias.unique().tolist() == [0.0]
    assert all(m.bias.unique().tolist() == pytest.approx([0.2]) for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.slow
def test_googlenet_runs_under_torch_compile():
    check_compiled_matches_eager("googlenet", 224, drop_rate=0.0, aux_drop_rate=0.0)


# the naive GoogLeNet shares GoogLeNet's layers: it runs at 64 and only in the slow suite
@pytest.mark.parametrize("name", ["googlenet", pytest.param("googlenet_naive", marks=pytest.mark.slow)])
def test_bfloat16_autocast(name):
    side = 64 if name == "googlenet_naive" else 224
    # bfloat16 keeps 8 bits: ~0.4% per rounding; a few percent after 10-20 layers of accumulation
    assert bf16_autocast_error(create(name), torch.randn(2, 3, side, side)) < 0.03
