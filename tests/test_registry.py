"""The model registry: names, `create`'s defaults and overrides, and its error messages."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightcnn.models import create, is_model, list_models, register_model, registry
from lightcnn.models.alexnet import AlexNet
from lightcnn.models.lenet import LeNet5


def test_list_models_filters_with_shell_patterns():
    vggs = list_models("vgg*")
    assert vggs == sorted(vggs)
    assert {"vgg11", "vgg19_bn"} <= set(vggs) and all(n.startswith("vgg") for n in vggs)
    assert list_models("no_such_family*") == []
    assert is_model("alexnet") and not is_model("alexnet2")


def test_unknown_name_lists_the_closest_names():
    with pytest.raises(ValueError, match=r"Unknown model 'vgg61'.*Closest registered names: .*vgg16"):
        create("vgg61")
    with pytest.raises(ValueError, match=r"googlenet"):
        create("googlenett")
    with pytest.raises(ValueError, match=r"list_models\(\)"):
        create("zzzzzz")


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="model name must be a str"):
        create(AlexNet)


def test_registering_a_name_twice_fails():
    def lenet5(**kwargs):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="registered twice"):
        register_model(lenet5)
    assert registry._MODELS["lenet5"] is not lenet5


def test_num_classes_defaults_to_the_paper_and_can_be_overridden():
    with torch.device("meta"):
        assert create("alexnet").num_classes == 1000
        assert create("lenet5").num_classes == 10
        model = create("alexnet", num_classes=10)
    assert model.fc8.out_features == 10 and model.default_cfg["num_classes"] == 10


def test_overrides_reach_the_model():
    with torch.device("meta"):
        model = create("alexnet", drop_rate=0.3, lrn_after=[], impl="reference")
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert not any(isinstance(m, torch.nn.LocalResponseNorm) for m in model.modules())


def test_misspelt_override_is_a_type_error_naming_the_knob():
    with pytest.raises(TypeError, match=r"create\('vgg16'\): unknown argument 'batch_norml' for VGG\. "
                                        r"Did you mean 'batch_norm'\?.*accepts: num_classes, in_chans"):
        create("vgg16", batch_norml=True)
    with pytest.raises(TypeError, match=r"unknown argument 'aux' for GoogLeNet"):
        create("googlenet", aux=False)


@pytest.mark.parametrize("name, kwargs, message", [
    ("vgg11", {"num_classes": "10"}, r"num_classes='10' does not fit VGG's num_classes: int \(got str\)"),
    ("vgg11", {"num_classes": True}, r"num_classes=True does not fit VGG's num_classes: int \(got bool\)"),
    ("alexnet", {"init": "xavier"},
     r"init='xavier' does not fit AlexNet's init: 'paper' \| 'zfnet' \| 'pytorch' \(got str\)"),
    ("alexnet", {"impl": 1}, r"impl=1 does not fit impl: 'auto' \| 'kernel' \| 'reference'\.$"),
    ("alexnet", {"impl": "kernal"}, r"impl='kernal' does not fit impl: 'auto' \| 'kernel' \| 'reference'\.$"),
    ("lenet5", {"impl": "kernel"}, r"unknown argument 'impl' for LeNet5"),
    ("wrn28_10", {"drop_rate": 0.3, "impl": "Kernel"}, r"impl='Kernel' does not fit impl: 'auto' \| 'kernel'"),
    ("alexnet", {"lrn_after": "01"}, r"lrn_after='01' does not fit AlexNet's lrn_after: Sequence\[int\]"),
    ("googlenet", {"drop_rate": "0.4"}, r"drop_rate='0.4' does not fit GoogLeNet's drop_rate: float"),
    ("lenet5_original", {"rbf_centres": "ascii"}, r"rbf_centres='ascii'"),
])
def test_ill_typed_override_is_a_clear_type_error(name, kwargs, message):
    with pytest.raises(TypeError, match=message):
        create(name, **kwargs)


def test_every_impl_argument_is_typed_impl():
    """Each model that takes `impl` annotates it `Impl | None`, so that `create` (and the CLI's --model.impl)
    rejects another value naming the choices; `impl` reaches every kernel-backed layer."""
    from typing import Optional, get_type_hints

    from lightcnn.layers import BNReLUConv2d, DenseConv2d, Impl, LocalResponseNorm

    takers = []
    for name in list_models():
        cls = registry._built_class(registry._MODELS[name])
        hints = get_type_hints(cls.__init__) if cls is not None else {}
        if "impl" in hints:
            assert hints["impl"] == Optional[Impl], f"{name}: impl is {hints['impl']}"
            takers.append(name)
    assert {"alexnet", "zfnet", "googlenet", "preact_resnet164", "wrn28_10", "densenet121"} <= set(takers)
    for layer in (LocalResponseNorm, BNReLUConv2d, DenseConv2d):
        assert get_type_hints(layer.__init__)["impl"] == Optional[Impl]
    for name in ("alexnet", "preact_resnet164", "densenet40_k12"):
        with torch.device("meta"):
            model = create(name, impl="reference")
        layers = [m for m in model.modules() if isinstance(m, (LocalResponseNorm, BNReLUConv2d))]
        assert layers and {m.impl for m in layers} == {"reference"}, name


def test_well_typed_overrides_pass_the_check():
    with torch.device("meta"):
        create("googlenet", drop_rate=1, aux_logits=False)  # an int is a fine float
        create("vgg11", stages=[[64], [128]], num_classes=5)  # lists where tuples are annotated
        create("lenet5_original", rbf_centres=None)
        create("lenet5", num_classes=np.int64(3))


def test_arguments_a_builder_consumes_itself_are_accepted_and_checked(monkeypatch):
    def tmp_builder(num_outputs: int = 10, **kwargs) -> LeNet5:
        return LeNet5(num_classes=num_outputs, **kwargs)

    monkeypatch.setitem(registry._MODELS, "tmp_builder", tmp_builder)  # removed again after the test
    assert create("tmp_builder", num_outputs=3, in_chans=2).num_classes == 3
    with pytest.raises(TypeError, match=r"num_outputs='3' does not fit LeNet5's num_outputs: int"):
        create("tmp_builder", num_outputs="3")
    with pytest.raises(TypeError, match=r"unknown argument 'num_output'.*Did you mean 'num_outputs'"):
        create("tmp_builder", num_output=3)
