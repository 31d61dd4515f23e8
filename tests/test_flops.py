"""FLOP formulas of the custom ops (torch.utils.flop_counter.register_flop_formula): FlopCounterMode
counts the same work with the kernels as with the PyTorch references, per op (forward and backward)
and for every registered model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from lightcnn import ops
from lightcnn.layers import BNReLUConv2d, default_impl
from lightcnn.models import create, list_models
from lightcnn.ops import _library
from tests.helpers import MetaShapes, has_kernel_layers, meta_model

pytestmark = pytest.mark.skipif(not _library.op_defined("bn_relu_conv2d") or not _library.op_defined("lrn"),
                                reason="lightcnn._C without the ops (build it first)")

# One model per kernel-backed layer and per way of building a network around it: LRN in a chain (alexnet) and
# in inception modules (googlenet), the fused BN-ReLU-conv in basic and bottleneck blocks (wrn16_8,
# preact_resnet164), DenseNet's op without and with the fused transition (densenet40_k12, densenet121). The
# other kernel-backed models run the same layers, and the models without one run no lightcnn op on any path
# (their MACs are asserted against the published counts in test_model_api.py): all of them are slow here.
FAST = {"alexnet", "googlenet", "wrn16_8", "preact_resnet164", "densenet40_k12", "densenet121"}


def _count(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops(), {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in list_models()])
def test_every_model_counts_the_same_macs_with_kernel_and_reference(name):
    """Eval forward at the model's input size, batch 1. The reference path is counted on the model's shared
    meta-device build (no lightcnn op runs on meta tensors); a model with kernel-backed layers is also built
    on fake CPU tensors (shapes only, no memory, no arithmetic) and counted with impl="kernel". The published
    MACs are asserted in test_model_api.py."""
    meta = meta_model(name).eval()
    x_size = (1, *meta.default_cfg["input_size"])
    with default_impl("reference"), torch.no_grad(), MetaShapes():
        reference, ref_per_op = _count(lambda: meta(torch.empty(x_size, device="meta")))
    assert reference > 0 and not any(op.startswith("lightcnn.") for op in ref_per_op), ref_per_op
    if not has_kernel_layers(meta):
        return
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = create(name).eval()
        with default_impl("kernel"), torch.no_grad():
            kernel, per_op = _count(lambda: model(torch.randn(x_size)))
    assert kernel == reference
    # the kernel path ran and was counted (lrn, bn_relu_conv2d, or the DenseNet op of DenseConv2d)
    assert any(op.startswith("lightcnn.") for op in per_op), per_op
    if any(isinstance(m, BNReLUConv2d) for m in model.modules()):
        assert any(op.startswith("lightcnn.") and n > 0 for op, n in per_op.items()), per_op


@pytest.mark.parametrize("config", [(3, 1, 1, 1, 1, True), (1, 2, 0, 1, 1, False), (3, 1, 2, 2, 2, True)])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_bn_relu_conv2d_counts_the_convolutions_forward_and_backward(config, drop_rate):
    k, stride, padding, dilation, groups, bias = config
    layer = BNReLUConv2d(4, 6, k, stride, padding, dilation, groups, bias=bias, drop_rate=drop_rate)
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    counts = {}
    for impl in ("kernel", "reference"):
        layer.impl = impl
        counts[impl] = _count(lambda: layer(x).sum().backward())
    kernel, per_op = counts["kernel"]
    assert set(per_op) == {"lightcnn.bn_relu_conv2d", "lightcnn.bn_relu_conv2d_backward"}
    assert kernel == counts["reference"][0]
    # forward independently: 2 * N * C_out * H_out * W_out * (C_in / groups) * k * k; backward as torch counts
    # the reference's convolution_backward (input and weight gradients)
    assert per_op["lightcnn.bn_relu_conv2d"] == 2 * layer(x).numel() * (4 // groups) * k * k
    assert per_op["lightcnn.bn_relu_conv2d_backward"] == counts["reference"][1]["aten.convolution_backward"]


def test_bn_relu_conv2d_op_counts_as_its_convolution_on_fake_tensors():
    with FakeTensorMode():
        x, w = torch.randn(8, 16, 32, 32), torch.randn(32, 16, 3, 3)
        fused, _ = _count(lambda: ops.bn_relu_conv2d(x, None, None, None, None, w, padding=1, training=True))
        conv, _ = _count(lambda: F.conv2d(x, w, padding=1))
    assert fused == conv == 2 * 8 * 32 * 32 * 32 * 16 * 9


def test_lrn_counts_as_its_reference_forward_and_backward():
    """FlopCounterMode counts matrix products and convolutions only: LRN is 0 on both paths."""
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    kernel, per_op = _count(lambda: ops.local_response_norm(x, 5).sum().backward())
    reference, _ = _count(lambda: F.local_response_norm(x, 5).sum().backward())
    assert kernel == reference == 0
    assert set(per_op) <= {"lightcnn.lrn", "lightcnn.lrn_backward"}
