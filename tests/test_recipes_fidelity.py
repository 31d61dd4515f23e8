"""The recipes as the released checkpoints were trained: DenseNet-121 with fb.resnet.torch's colour and
lighting noise, Inception-v4 / Inception-ResNet-v2 with TF-slim's auxiliary head, BN decay, BN without scale
and 5% crops, FractalNet with the authors' BN without scale and shift; and the ImageNet data knobs they use
(`crop_scale_min`, `color_jitter`, `lighting`)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from lightcnn.data.imagenet import PCA_EIGVAL, PCA_EIGVEC, ImageNetDataModule, Lighting, imagenet_transforms
from tests.helpers import build_experiment


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])


def test_lighting_adds_eigvec_times_alpha_eigval_to_every_pixel():
    img = torch.rand(3, 5, 4)
    torch.manual_seed(3)
    out = Lighting(0.1)(img)
    torch.manual_seed(3)
    alpha = torch.randn(3) * 0.1
    shift = [sum(PCA_EIGVEC[i][j] * alpha[j].item() * PCA_EIGVAL[j] for j in range(3)) for i in range(3)]
    torch.testing.assert_close(out - img, torch.tensor(shift).view(3, 1, 1).expand(3, 5, 4))
    assert torch.equal(Lighting(0.0)(img), img)


def test_colour_knobs_act_on_the_unit_range_image_before_normalisation():
    tf = imagenet_transforms("inception", 16, 20, crop_scale_min=0.05, color_jitter=0.4, lighting=0.1)
    kinds = [type(t) for t in tf.transforms]
    assert kinds == [v2.ToImage, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ToDtype, v2.ColorJitter,
                     Lighting, v2.Normalize]
    crop, jitter = tf.transforms[1], tf.transforms[4]
    assert crop.scale == (0.05, 1.0)
    assert jitter.brightness == jitter.contrast == jitter.saturation == (0.6, 1.4) and jitter.hue is None
    assert tf.transforms[5].std == 0.1
    evaluation = imagenet_transforms("none", 16, 20, color_jitter=0.4, lighting=0.1)
    assert not any(isinstance(t, (v2.ColorJitter, Lighting)) for t in evaluation.transforms)
    default = imagenet_transforms("inception", 16, 20)
    assert default.transforms[1].scale == (0.08, 1.0) and len(default.transforms) == 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop_scale_min=0.0), "crop_scale_min must be in"),
    (dict(augmentation="alexnet", crop_scale_min=0.05), "crop_scale_min is the 'inception'"),
    (dict(color_jitter=1.5), "color_jitter must be in"),
    (dict(lighting=-0.1), "lighting >= 0"),
])
def test_bad_colour_knobs_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageNetDataModule(root="nowhere", **kwargs)


def test_densenet121_recipe_adds_fb_resnet_torch_colour_and_lighting(tmp_path):
    data = build_experiment("densenet121_imagenet", tmp_path).datamodule
    assert data.colour == dict(crop_scale_min=0.08, color_jitter=0.4, lighting=0.1)


@pytest.mark.parametrize("name", ["inception_v4_imagenet", "inception_resnet_v2_imagenet"])
def test_inception_recipes_train_as_tf_slim(name, tmp_path):
    cli = build_experiment(name, tmp_path)
    net, module = cli.model.net, cli.model
    assert net.AuxLogits is not None and module.hparams.aux_loss_weights == 0.4
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert {b.momentum for b in bns} == {0.0003} and not any(b.weight.requires_grad for b in bns)
    assert cli.datamodule.colour["crop_scale_min"] == 0.05 and cli.datamodule.colour["color_jitter"] == 0.0


def test_fractalnet_recipe_is_the_authors_caffe_network(tmp_path):
    net = build_experiment("fractalnet20_cifar10", tmp_path).model.net
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == 33_714_314
    assert not any(m.affine for m in net.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", ["inception_v4_imagenet", "inception_resnet_v2_imagenet", "nasnet_a_cifar10"])
def test_tf_slim_recipes_decay_conv_and_linear_weights_only(name, tmp_path):
    """TF-slim's regularisers act on convolution and linear weights: no decay on BN and biases."""
    module = build_experiment(name, tmp_path).model
    assert module.hparams.weight_decay_norm_bias is False
    cfg = module.configure_optimizers()
    optimizer = cfg["optimizer"] if isinstance(cfg, dict) else cfg
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for m in module.net.modules():
        for p in m.parameters(recurse=False):
            if not p.requires_grad:  # BN without scale: gamma frozen at 1, in no parameter group
                assert id(p) not in optimised
                continue
            decayed = id(p) not in no_decay
            assert decayed == (isinstance(m, (nn.Conv2d, nn.Linear)) and p is m.weight), (type(m).__name__, p.shape)
