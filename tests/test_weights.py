"""`lightcnn.models.weights.from_torchvision`: one entry point for every model with a torchvision twin."""
import pytest
import torch
import torchvision

from lightcnn.models.weights import TWINS, from_torchvision, register_twin, twins
from tests.helpers import MetaShapes


@pytest.mark.parametrize("name,tv_builder,as_state_dict", [
    ("resnet18", torchvision.models.resnet18, False),
    ("resnet18", torchvision.models.resnet18, True),
    ("vgg11", torchvision.models.vgg11, True),
])
def test_from_torchvision_serves_every_family(name, tv_builder, as_state_dict):
    tv = tv_builder(weights=None, num_classes=7).eval()
    ours = from_torchvision(name, tv.state_dict() if as_state_dict else tv).eval()
    assert ours.num_classes == 7
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)


def test_every_twin_is_a_torchvision_builder_of_the_same_parameter_count():
    names = twins("torchvision")
    assert {"alexnet_owt", "vgg16_bn", "resnet50", "resnext50_32x4d"} <= set(names)
    for name in names:
        tv_name = {"alexnet_owt": "alexnet", "sd_resnet152": "resnet152"}.get(name, name)
        with torch.device("meta"), MetaShapes():
            tv = getattr(torchvision.models, tv_name)()
            from lightcnn.models import create
            ours = create(name, **TWINS[("torchvision", name)].overrides)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters()), name


def test_from_torchvision_names_the_models_that_have_a_twin():
    with pytest.raises(ValueError, match="no torchvision twin.*resnet50.*vgg16"):
        from_torchvision("wrn28_10", {})
    with pytest.raises(TypeError, match="nn.Module or its state_dict"):
        from_torchvision("vgg11", 3)


def test_a_twin_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_twin("torchvision", "vgg11", lambda model, sd: sd)
