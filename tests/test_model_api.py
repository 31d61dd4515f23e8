"""The model contract, run over every registered model (`list_models()`), as timm's tests/test_models.py:
a family is tested the day its builders are registered.

Every model: builds; `forward_features` then `forward_head` give `(N, num_classes)` logits and
`pre_logits=True` gives `(N, num_features)`; `default_cfg` describes an input the model really takes
and the class count it really has; `num_classes`/`in_chans` overrides reach the network and its cfg;
auxiliary heads appear only in training mode, as a named tuple of logits; trainable parameters equal
`lightcnn/published.py`'s `params + aux_params` exactly and MACs its `gmacs` within 1%, where it lists
the model. Shapes, counts and MACs are taken on the meta device (no memory, no arithmetic); the
real-valued checks (eval determinism, forward == head(features)) run on the CPU at the native input
size, marked slow for the models above 1 GMAC. The networks of a thousand layers and more (`DEEP`) take
seconds per meta forward: their contract is slow; their shallower siblings run the same code fast.
"""
from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightcnn.constants import DATASETS
from lightcnn.models import create, list_models
from lightcnn.published import published

NAMES = list_models()
LIGHT_GMACS = 1.0  # real forward passes above this are slow on the 2-core CI machine
DEEP = {"resnet1202", "sd_resnet1202", "preact_resnet1001"}
CONTRACT = [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in NAMES]


def _meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create(name, **kwargs)


@functools.cache
def _meta_default(name: str) -> nn.Module:
    """One meta-device build per model in its default configuration, shared by the tests that only read it
    (each sets train/eval mode itself)."""
    return _meta(name)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _gmacs(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """published.py's convention: FlopCounterMode FLOPs / 2, eval mode, batch 1."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, *input_size, device="meta"))
    return counter.get_total_flops() / 2 / 1e9


def _heavy(name: str) -> bool:
    pub = published(name)
    if pub is not None and pub.gmacs is not None:
        return pub.gmacs > LIGHT_GMACS
    model = _meta_default(name)
    return _gmacs(model, model.default_cfg["input_size"]) > LIGHT_GMACS


def test_every_registered_model_is_in_this_contract():
    assert len(NAMES) >= 39 and NAMES == sorted(NAMES)


@pytest.mark.parametrize("name", CONTRACT)
def test_features_then_head_give_logits_and_pre_logits(name):
    model = _meta_default(name).eval()
    c, h, w = model.default_cfg["input_size"]
    x = torch.empty(2, c, h, w, device="meta")
    feats = model.forward_features(x)
    assert feats.ndim == 4 and feats.shape[0] == 2
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert model.forward_head(feats).shape == (2, model.num_classes)
    assert model(x).shape == (2, model.num_classes)


@pytest.mark.parametrize("name", CONTRACT)
def test_default_cfg_describes_what_the_model_takes(name):
    model = _meta_default(name)
    cfg = model.default_cfg
    assert set(cfg) >= {"input_size", "mean", "std", "dataset", "num_classes"}
    assert cfg["dataset"] in DATASETS
    c, h, w = cfg["input_size"]
    assert c == model.in_chans and len(cfg["mean"]) == len(cfg["std"]) == c
    assert cfg["num_classes"] == model.num_classes
    out = model.eval()(torch.empty(2, c, h, w, device="meta"))
    assert out.shape == (2, cfg["num_classes"])
    pub = published(name)
    if pub is not None:
        assert (h, w) == (pub.input_side, pub.input_side)


@pytest.mark.parametrize("name", CONTRACT)
def test_num_classes_and_in_chans_overrides_reach_the_network_and_its_cfg(name):
    model = _meta(name, num_classes=7, in_chans=2)
    cfg = model.default_cfg
    assert (model.num_classes, model.in_chans) == (7, 2)
    assert cfg["num_classes"] == 7 and cfg["input_size"][0] == 2 and len(cfg["mean"]) == 2
    x = torch.empty(2, *cfg["input_size"], device="meta")
    assert model.eval()(x).shape == (2, 7)


@pytest.mark.parametrize("name", CONTRACT)
def test_aux_heads_only_in_training_as_a_named_tuple_of_logits(name):
    model = _meta_default(name)
    x = torch.empty(2, *model.default_cfg["input_size"], device="meta")
    out = model.train()(x)
    if isinstance(out, tuple):  # e.g. GoogLeNet's (logits, aux_logits2, aux_logits1)
        assert hasattr(out, "_fields") and out._fields[0] == "logits"  # a named tuple, main logits first
        assert all(isinstance(o, torch.Tensor) and o.shape == (2, model.num_classes) for o in out)
    assert isinstance(model.eval()(x), torch.Tensor)


@pytest.mark.parametrize("name", [p for p in CONTRACT if published(getattr(p, "values", [p])[0]) is not None])
def test_parameters_and_macs_equal_published(name):
    pub = published(name)
    model = _meta_default(name)
    if pub.params is not None:
        assert _params(model) == pub.params + pub.aux_params
    if pub.gmacs is not None:
        assert _gmacs(model, (model.in_chans, pub.input_side, pub.input_side)) == pytest.approx(pub.gmacs, rel=0.01)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _heavy(n) else n for n in NAMES])
def test_eval_is_deterministic_and_equals_head_of_features(name):
    torch.manual_seed(0)
    model = create(name).eval()
    x = torch.randn(2, *model.default_cfg["input_size"])
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), y)


def test_importing_the_data_package_loads_no_model_and_no_kernel():
    """Imports run one way: data and models both read lightcnn.constants, neither loads the other."""
    code = ("import sys, lightcnn.data; "
            "print(sorted(m for m in sys.modules if m.startswith(('lightcnn.models', 'lightcnn._C', 'lightcnn.ops'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_make_default_cfg_from_the_knobs():
    from lightcnn.models.base import make_default_cfg

    assert make_default_cfg("cifar", 100, 3)["dataset"] == "cifar100"
    grey = make_default_cfg("cifar", 10, 1)
    assert grey["mean"] == (0.5,) and grey["input_size"] == (1, 32, 32)
    assert make_default_cfg("imagenet", 1000, 3, 227)["mean"] == DATASETS["imagenet"]["mean"]
    cfg = make_default_cfg("imagenet", 5, 2, (240, 320), mean=(0.5,), std=(0.25,))
    assert cfg["input_size"] == (2, 240, 320) and cfg["mean"] == (0.5, 0.5) and cfg["std"] == (0.25, 0.25)
    with pytest.raises(ValueError, match="1 or 3 values"):
        make_default_cfg("imagenet", 5, 3, mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_default_cfg("mnist", 10, 1)
    assert create("resnet18", in_chans=1).default_cfg["input_size"] == (1, 224, 224)
