"""The model contract, run over every registered model (`list_models()`), as timm's tests/test_models.py:
a family is tested the day its builders are registered.

Every model: builds; `forward_features` then `forward_head` give `(N, num_classes)` logits and
`pre_logits=True` gives `(N, num_features)`; `default_cfg` describes an input the model really takes
and the class count it really has; `num_classes`/`in_chans` overrides reach the network and its cfg;
auxiliary heads appear only in training mode, as a named tuple of logits; timm's model API
(`feature_info` equal to the stage maps' real channels and cumulative stride, `forward_intermediates`,
`create(features_only=True)`, `reset_classifier`/`get_classifier`, torchvision's FX
`create_feature_extractor`) on every model; trainable parameters equal
`lightcnn/published.py`'s `params + aux_params` exactly and MACs its `gmacs` within 0.2%, where it lists
the model (the one place that asserts the published counts of every model). Shapes, counts and MACs are
taken on the meta device (no memory, no arithmetic), under `tests.helpers.MetaShapes`; the
real-valued checks (eval determinism, forward == head(features)) run on the CPU at the native input
size, marked slow for the models above 1 GMAC. The networks of a thousand layers and more (`DEEP`) take
seconds per meta forward: their contract is slow; their shallower siblings run the same code fast. The larger
members of a family, whose smaller member runs the same blocks (`LARGE`), have their shape contract slow too,
their published counts fast. The contract tests read one shared eval pass per model (`_eval_pass`).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightcnn.constants import DATASETS
from lightcnn.models import create, list_models
from lightcnn.models.base import FeatureExtractor
from lightcnn.published import published
from tests.helpers import FAST, SMALL, MetaShapes, build_meta, macs, meta_model, n_params, small

NAMES = list_models()
LIGHT_GMACS = 1.0  # real forward passes above this are slow on the 2-core CI machine
DEEP = {"resnet1202", "sd_resnet1202", "preact_resnet1001"}
CONTRACT = [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in NAMES]
# The larger members of a family whose smaller member runs the same blocks through the same builder code, only
# more of them or wider (densenet121, densenet40_k12 and densenet_bc100_k12 for the DenseNets, nasnet_a_mobile
# for nasnet_a_large, resnet18, resnet50 and resnext50_32x4d for the deeper ImageNet ResNets, resnet20 for the
# CIFAR ResNets, resnext29_8x64d, wrn16_8, vgg11 and vgg11_bn): their shape contract is slow; their published
# counts, where the configurations differ, are asserted in the fast suite all the same.
LARGE = {"densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc190_k40", "densenet_bc250_k24",
         "densenet100_k12", "nasnet_a_large", "resnet34", "resnet101", "resnet152", "resnext101_32x8d", "resnet32",
         "resnet44", "resnet56", "resnet110", "resnext29_16x64d", "wrn28_10", "wrn40_4", "vgg13", "vgg13_bn",
         "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"}
SHAPES = [pytest.param(n, marks=pytest.mark.slow) if n in DEEP | LARGE else n for n in NAMES]


@pytest.fixture(autouse=True)
def _shapes_only():
    """Every meta-device build and forward of this file without the reference arithmetic (real tensors run as
    they are)."""
    with MetaShapes():
        yield


# The models published.py gives no MACs for that are above LIGHT_GMACS all the same (FlopCounterMode at their
# default input size; test_the_unpublished_heavy_models_are_the_counted_ones): _heavy runs at collection, in
# every worker, where counting would cost seconds.
UNPUBLISHED_HEAVY = {"densenet100_k12", "densenet161", "googlenet_naive"}


def _heavy(name: str) -> bool:
    pub = published(name)
    if pub is not None and pub.gmacs is not None:
        return pub.gmacs > LIGHT_GMACS
    return name in UNPUBLISHED_HEAVY


def test_the_unpublished_heavy_models_are_the_counted_ones():
    unpublished = [n for n in NAMES if published(n) is None or published(n).gmacs is None]
    counted = {n for n in unpublished
               if macs(meta_model(n), meta_model(n).default_cfg["input_size"][1]) / 1e9 > LIGHT_GMACS}
    assert counted == UNPUBLISHED_HEAVY


class EvalPass(NamedTuple):
    features: torch.Tensor
    pre_logits: torch.Tensor
    head: torch.Tensor
    logits: torch.Tensor
    gmacs: float  # per image


@functools.cache
def _eval_pass(name: str) -> EvalPass:
    """One eval-mode meta forward per model at its default input size, batch 2, read by every contract test
    that checks it: features, `forward_head` of them, `model(x)`, and its MACs per image (published.py's
    convention; convolution and matmul FLOPs grow linearly with the batch)."""
    model = meta_model(name).eval()
    x = torch.empty(2, *model.default_cfg["input_size"], device="meta")
    features = model.forward_features(x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits = model(x)
    gmacs = counter.get_total_flops() / 2 / 2 / 1e9
    return EvalPass(features, model.forward_head(features, pre_logits=True), model.forward_head(features), logits,
                    gmacs)


def test_every_registered_model_is_in_this_contract():
    assert len(NAMES) >= 39 and NAMES == sorted(NAMES)


@pytest.mark.parametrize("name", SHAPES)
def test_features_then_head_give_logits_and_pre_logits(name):
    model, out = meta_model(name), _eval_pass(name)
    assert out.features.ndim == 4 and out.features.shape[0] == 2
    assert out.pre_logits.shape == (2, model.num_features)
    assert out.head.shape == (2, model.num_classes)
    assert out.logits.shape == (2, model.num_classes)


@pytest.mark.parametrize("name", SHAPES)
def test_default_cfg_describes_what_the_model_takes(name):
    model = meta_model(name)
    cfg = model.default_cfg
    assert set(cfg) >= {"input_size", "mean", "std", "dataset", "num_classes"}
    assert cfg["dataset"] in DATASETS
    c, h, w = cfg["input_size"]
    assert c == model.in_chans and len(cfg["mean"]) == len(cfg["std"]) == c
    assert cfg["num_classes"] == model.num_classes
    assert _eval_pass(name).logits.shape == (2, cfg["num_classes"])  # the model takes (2, *input_size)
    pub = published(name)
    if pub is not None:
        assert (h, w) == (pub.input_side, pub.input_side)


@pytest.mark.parametrize("name", SHAPES)
def test_num_classes_and_in_chans_overrides_reach_the_network_and_its_cfg(name):
    model = build_meta(name, num_classes=7, in_chans=2)
    cfg = model.default_cfg
    assert (model.num_classes, model.in_chans) == (7, 2)
    assert cfg["num_classes"] == 7 and cfg["input_size"][0] == 2 and len(cfg["mean"]) == 2
    x = torch.empty(2, *cfg["input_size"], device="meta")
    assert model.eval()(x).shape == (2, 7)


@pytest.mark.parametrize("name", SHAPES)
def test_aux_heads_only_in_training_as_a_named_tuple_of_logits(name):
    model = meta_model(name)
    x = torch.empty(2, *model.default_cfg["input_size"], device="meta")
    out = model.train()(x)
    model.eval()
    if isinstance(out, tuple):  # e.g. GoogLeNet's (logits, aux_logits2, aux_logits1)
        assert hasattr(out, "_fields") and out._fields[0] == "logits"  # a named tuple, main logits first
        assert all(isinstance(o, torch.Tensor) and o.shape == (2, model.num_classes) for o in out)
    assert isinstance(_eval_pass(name).logits, torch.Tensor)


@pytest.mark.parametrize("name", [p for p in CONTRACT if published(getattr(p, "values", [p])[0]) is not None])
def test_parameters_and_macs_equal_published(name):
    pub = published(name)
    model = meta_model(name)
    if pub.params is not None:
        assert n_params(model) == pub.params + pub.aux_params
    if pub.gmacs is not None:
        side = pub.input_side
        gmacs = (_eval_pass(name).gmacs if model.default_cfg["input_size"][1:] == (side, side)
                 else macs(model, side) / 1e9)
        assert gmacs == pytest.approx(pub.gmacs, rel=2e-3)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _heavy(n) else n for n in NAMES])
def test_eval_is_deterministic_and_equals_head_of_features(name):
    torch.manual_seed(0)
    model = create(name).eval()
    x = torch.randn(2, *model.default_cfg["input_size"])
    if name in DEEP:  # untrained, under BN's default statistics, a thousand-layer residual sum overflows float32:
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn.reset_running_stats()
            bn.momentum = None  # the statistics of one training-mode pass over x
        with torch.no_grad():
            model.train()(x)
        model.eval()
    with torch.no_grad():
        y = model(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), y)


def _imported_at_import(module: str) -> set[str]:
    """The lightcnn modules that `import module` runs, read from the source: the packages' `__init__` files and
    the import statements at module level (those inside functions or under `if TYPE_CHECKING:` run later or
    never), followed transitively."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            mod = ".".join(parts[:i])
            spec = importlib.util.find_spec(mod)
            if mod in seen or spec is None or spec.origin is None or not spec.origin.endswith(".py"):
                continue
            seen.add(mod)
            package = mod if spec.submodule_search_locations is not None else mod.rpartition(".")[0]
            tree = ast.parse(Path(spec.origin).read_text())
            for node in _module_level(tree.body):
                if isinstance(node, ast.Import):
                    todo += [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                        if node.level else node.module
                    todo.append(base)
                    base_spec = importlib.util.find_spec(base) if base.startswith("lightcnn") else None
                    if base_spec is not None and base_spec.submodule_search_locations is not None:  # a package
                        todo += [f"{base}.{a.name}" for a in node.names
                                 if importlib.util.find_spec(f"{base}.{a.name}") is not None]
        todo = [t for t in todo if t.startswith("lightcnn")]
    return seen


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when a module is imported, through `if`/`try` blocks at module level."""
    out = []
    for node in body:
        if isinstance(node, ast.If):
            out += ([] if "TYPE_CHECKING" in ast.unparse(node.test) else _module_level(node.body))
            out += _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body])
        else:
            out.append(node)
    return out


def test_importing_the_data_package_loads_no_model():
    """Imports run one way: data and models both read lightcnn.constants, neither loads the other (read from
    the source here; the real import in a fresh process is the slow twin below). (The kernels are loaded by
    `import lightcnn` itself, so that files exported with them load after it.)"""
    loaded = _imported_at_import("lightcnn.data")
    assert {"lightcnn", "lightcnn.constants", "lightcnn.data"} <= loaded
    assert not {m for m in loaded if m.startswith(("lightcnn.models", "lightcnn.layers"))}, sorted(loaded)
    assert "lightcnn.models.resnet" in _imported_at_import("lightcnn.models")  # the reading follows imports


@pytest.mark.slow
def test_importing_the_data_package_loads_no_model_in_a_fresh_process():
    code = ("import sys, lightcnn.data; "
            "print(sorted(m for m in sys.modules if m.startswith(('lightcnn.models', 'lightcnn.layers'))))")
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


# --- timm's model API -----------------------------------------------------------------------------------
SMALL_PARAMS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in SMALL]


def _stage_maps(model: nn.Module, side: int) -> list[torch.Tensor]:
    x = torch.empty(1, model.in_chans, side, side, device="meta")
    return model.forward_intermediates(x, intermediates_only=True)


@pytest.mark.parametrize("name", SHAPES)
def test_feature_info_gives_the_channels_and_stride_of_the_stage_maps(name):
    """Declared channels equal the maps'; the reduction is the cumulative stride, measured as the input
    growth per output pixel between two input sides 64 apart (exact for any padding or ceil mode)."""
    model = meta_model(name).eval()
    info = model.feature_info
    assert len(info) >= 3 and all(set(f) == {"module", "num_chs", "reduction"} for f in info)
    assert info.reduction() == sorted(info.reduction())
    side = model.default_cfg["input_size"][1]
    small_maps, large_maps = _stage_maps(model, side), _stage_maps(model, side + 64)
    assert [m.shape[1] for m in small_maps] == info.channels()
    assert [64 // (b.shape[-1] - a.shape[-1]) for a, b in zip(small_maps, large_maps)] == info.reduction()
    assert all(64 % (b.shape[-1] - a.shape[-1]) == 0 for a, b in zip(small_maps, large_maps))


@pytest.mark.parametrize("name", SHAPES)
def test_features_only_and_reset_classifier(name):
    """create(features_only=True, out_indices) gives the selected maps and has no classifier left;
    reset_classifier(n) gives n logits (and n from every auxiliary head while training), 0 the pooled
    features; get_classifier() is the new layer."""
    feats = build_meta(name, features_only=True, out_indices=(0, -1))
    assert isinstance(feats, FeatureExtractor)
    full = meta_model(name)
    assert feats.feature_info == [full.feature_info[0], full.feature_info[-1]]
    x = torch.empty(2, *full.default_cfg["input_size"], device="meta")
    maps = feats.eval()(x)
    assert [m.shape[1] for m in maps] == feats.feature_info.channels()
    assert isinstance(feats.model.get_classifier(), nn.Identity)

    model = feats.model  # its classifier is gone: give it a new one
    pooled = maps[-1]  # the last stage's map has forward_features' shape
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.default_cfg["num_classes"] == 7
    assert model.get_classifier() is model.get_submodule(model.classifier_name)
    assert model.eval().forward_head(pooled).shape == (2, 7)
    if model.aux_classifier_names():  # the auxiliary heads are reset too
        assert all(o.shape == (2, 7) for o in model.train()(x))
    model.reset_classifier(0)
    assert model.eval().forward_head(pooled).shape == (2, model.num_features)


def test_forward_intermediates_takes_timms_indices():
    model, x = small("resnet18")
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [m.shape[1] for m in maps] == model.feature_info.channels() == [8, 8, 8, 16, 16]
        last2 = model.forward_intermediates(x, 2, intermediates_only=True)
        picked = model.forward_intermediates(x, [0, -1], intermediates_only=True)
    torch.testing.assert_close(last2, maps[-2:], rtol=0, atol=0)
    torch.testing.assert_close(picked, [maps[0], maps[-1]], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range: this network has 5 stages"):
        model.forward_intermediates(x, [5])
    with pytest.raises(ValueError, match="needs features_only=True"):
        create("resnet20", out_indices=(1,))


@pytest.mark.parametrize("name", SMALL_PARAMS)
def test_grad_checkpointing_gives_equal_outputs_gradients_and_running_stats(name):
    """Per-block activation checkpointing: the same outputs and gradients (dropout, drop-path and stochastic
    depth draw the same in the recomputation), BatchNorm statistics updated once."""
    import copy

    model, x = small(name)
    model.train()
    ckpt = copy.deepcopy(model)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing and len(ckpt.checkpoint_units()) >= 2
    outs = []
    for m in (model, ckpt):
        torch.manual_seed(1)
        out = m(x)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (key, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=key)
    for (key, b), c in zip(model.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=key)
    ckpt.set_grad_checkpointing(False)
    assert all("forward" not in u.__dict__ for u in ckpt.checkpoint_units())


def _fx_nodes(model: nn.Module) -> dict[str, str]:
    """Return nodes for create_feature_extractor: each stage whose module is a node of the traced graph,
    and the network's output."""
    from torchvision.models.feature_extraction import get_graph_node_names

    _, eval_nodes = get_graph_node_names(model)
    nodes = {f["module"]: f"stage{i}" for i, f in enumerate(model.feature_info) if f["module"] in eval_nodes}
    return {**nodes, eval_nodes[-1]: "out"}


# FX traces each model four times (train and eval, nodes and extractor): the long graphs are slow, and so are
# the larger members of a family (LARGE).
FX_SLOW = DEEP | LARGE | {n for n in NAMES if n.startswith("nasnet")} | {"inception_resnet_v2"}


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in FX_SLOW else n for n in NAMES])
def test_torchvision_create_feature_extractor_traces_every_model(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    model = meta_model(name).eval()  # traced, not changed
    extractor = create_feature_extractor(model, return_nodes=_fx_nodes(model))
    out = extractor(torch.empty(2, *model.default_cfg["input_size"], device="meta"))
    assert out["out"].shape == (2, model.num_classes)
    channels = dict(zip([f"stage{i}" for i in range(len(model.feature_info))], model.feature_info.channels()))
    assert all(out[k].shape[1] == channels[k] for k in out if k != "out")


@pytest.mark.filterwarnings("ignore:NOTE. The nodes obtained by tracing")
@pytest.mark.parametrize("name", SMALL_PARAMS)
def test_feature_extractor_equals_eager(name):
    from torchvision.models.feature_extraction import create_feature_extractor

    model, x = small(name)
    extractor = create_feature_extractor(model, return_nodes=_fx_nodes(model))
    with torch.no_grad():
        out = extractor(x)
        _, maps = model.forward_intermediates(x)
        torch.testing.assert_close(out.pop("out"), model(x))
    assert out  # at least one stage is a node of the graph
    for key, value in out.items():
        torch.testing.assert_close(value, maps[int(key.removeprefix("stage"))])
