"""LeNet-5 (LeCun et al. 1998: `lenet5_original`, and the modern `lenet5`): counts, Table I's C3 connections,
the paper's layers (scaled tanh, trainable subsampling, RBF output), input levels, compile and autocast.

Counts are taken on the meta device; everything else runs small real tensors on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from lightcnn.models import create, list_models
from lightcnn.published import published
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
    macs,
    n_params,
)

LENET = ["lenet5", "lenet5_original"]


def test_every_lenet_model_is_registered():
    assert set(LENET) <= set(list_models())


@pytest.mark.parametrize("name", LENET)
def test_default_cfg_and_paper_class_count(name):
    check_default_cfg(name, num_classes=10, dataset="digits", side=32)


@pytest.mark.parametrize("name", ["lenet5"])
def test_params_and_macs_match_reference(name):
    check_published_counts(name, 32)


def test_lenet5_original_has_the_papers_parameters_per_layer():
    model = build_meta("lenet5_original")
    per_layer = {name: n_params(m) for name, m in model.features.named_children() if n_params(m)}
    assert per_layer == {"c1": 156, "s2": 12, "c3": 1_516, "s4": 32, "c5": 48_120}
    assert n_params(model.f6) == 10_164
    assert n_params(model) == published("lenet5_original").params
    # the RBF centres are fixed: a buffer of 10 x 84 +-1 values, not a parameter
    assert model.output.centres.shape == (10, 84) and not any(p is model.output.centres for p in model.parameters())
    # MACs by formula (the RBF's distances are not a matmul and are not counted):
    # C1 6x25 per output at 28x28, C3 60 connections x 25 at 10x10, C5 120 x 400, F6 120 x 84
    assert macs(model, 32) == 6 * 25 * 28**2 + 60 * 25 * 10**2 + 120 * 400 + 120 * 84


def test_lenet5_original_c3_reads_only_table1_connections():
    model = create("lenet5_original")
    table = [  # Table I, by column: the S2 maps each C3 map reads
        (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5), (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5),
        (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5), (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5), (0, 1, 2, 3, 4, 5),
    ]
    s2 = torch.randn(1, 6, 14, 14, requires_grad=True)
    out = model.features.c3(s2)
    assert out.shape == (1, 16, 10, 10)
    for j, inputs in enumerate(table):
        (grad,) = torch.autograd.grad(out[0, j].sum(), s2, retain_graph=True)
        reads = [i for i in range(6) if grad[0, i].abs().sum() > 0]
        assert reads == list(inputs), f"C3 map {j}"


def test_lenet5_original_layers_follow_the_paper():
    model = create("lenet5_original")
    act = model.features.act1
    assert act(torch.tensor([1.0, -1.0])).tolist() == pytest.approx([1.0, -1.0], abs=1e-4)  # f(+-1) = +-1
    # S2: (sum of each 2x2 block) * coefficient + bias, per map
    s2 = model.features.s2
    x = torch.randn(1, 6, 28, 28)
    blocks = x.unfold(2, 2, 2).unfold(3, 2, 2).sum((-1, -2))
    torch.testing.assert_close(s2(x), blocks * s2.weight.view(1, -1, 1, 1) + s2.bias.view(1, -1, 1, 1))
    # output: minus the squared Euclidean distance of F6's output to each fixed +-1 centre
    x = torch.randn(3, 1, 32, 32)
    f6 = model.forward_head(model.forward_features(x), pre_logits=True)
    expected = -torch.cdist(f6, model.output.centres).pow(2)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    assert set(model.output.centres.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(c.tolist()) for c in model.output.centres}) == 10  # ten distinct codes
    assert create("lenet5_original", num_classes=26).output.centres.shape == (26, 84)


@pytest.mark.parametrize("name, background, ink", [("lenet5", -1.0, 1.0), ("lenet5_original", -0.1, 1.175)])
def test_digits_data_applies_the_normalisation_the_lenet_cfg_declares(name, background, ink):
    """lenet5_original's cfg carries the paper's input levels (section II-B: background -0.1, ink 1.175),
    lenet5's the digits data set's 0.5/0.5; the data module, fed by the network, produces exactly them."""
    from types import SimpleNamespace

    from lightcnn.data import DigitsDataModule

    model = create(name)
    cfg = model.default_cfg
    assert ((0.0 - cfg["mean"][0]) / cfg["std"][0], (1.0 - cfg["mean"][0]) / cfg["std"][0]) == pytest.approx(
        (background, ink))
    dm = DigitsDataModule(batch_size=8)
    dm.trainer = SimpleNamespace(world_size=1, lightning_module=SimpleNamespace(net=model))
    dm.setup("fit")
    x = torch.stack([dm.train_set[i][0] for i in range(64)])
    assert x[..., 0, 0].unique().tolist() == pytest.approx([background])  # the padded border
    assert x.max().item() <= ink + 1e-5 and x.max().item() > background + 0.9 * (ink - background)


@pytest.mark.parametrize("name", LENET)
def test_forward_backward_at_native_size(name):
    check_forward_backward(name, num_classes=10)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_device_match_float64_reference_end_to_end(device):
    check_kernels_match_float64_reference("lenet5_original", 32, device)


@pytest.mark.parametrize("name", LENET)
def test_eval_is_deterministic_and_equals_features_then_head(name):
    check_eval_is_features_then_head(name, 32)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_lenet5_original_runs_under_torch_compile(backend):
    # dynamo and AOT autograd trace the sparse C3 and the RBF output (the model's own Python); inductor's C++ code
    # generation of them is the slow twin (the fast suite lowers a lightcnn op with inductor in test_lrn.py)
    check_compiled_matches_eager("lenet5_original", 32, backend=backend)


@pytest.mark.parametrize("name", LENET)
def test_bfloat16_autocast(name):
    # bfloat16 keeps 8 bits: ~0.4% per rounding; a few percent after 10-20 layers of accumulation (the RBF's
    # logits share a large offset, which the centring removes)
    model = create(name)
    assert bf16_autocast_error(model, torch.randn(2, model.in_chans, 32, 32)) < 0.03
