"""One small member of every model family, for the tests that run real arithmetic (model API, export):
(registered name, keyword overrides that shrink it, input side). The overrides keep each family's blocks
and stage layout; `FAST` is the subset the default suite runs, the others are marked slow where used."""
from __future__ import annotations

import torch
from torch import nn

from lightcnn.models import create

SMALL: dict[str, tuple[dict, int]] = {
    "lenet5": ({}, 32),
    "lenet5_original": ({}, 32),
    "alexnet": (dict(hidden_features=32, num_classes=5), 67),
    "zfnet": (dict(hidden_features=32, num_classes=5), 67),
    "vgg11_bn": (dict(stages=((8,), (8,), (16,), (16,), (16,)), hidden_features=16, num_classes=5), 32),
    "resnet20": (dict(layers=(1, 1, 1)), 16),
    "resnet18": (dict(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8, num_classes=5), 64),
    "resnext29_8x64d": (dict(layers=(1, 1, 1), base_width=16, cardinality=2, widths=(8, 16, 16), stem_width=8), 16),
    "sd_resnet110": (dict(layers=(2, 2, 2)), 16),
    "preact_resnet164": (dict(layers=(1, 1, 1), widths=(4, 8, 8), stem_width=8), 16),
    "wrn16_2": (dict(layers=(1, 1, 1), drop_rate=0.3), 16),
    "densenet40_k12": (dict(block_config=(2, 2, 2)), 16),
    "densenet121": (dict(block_config=(1, 2, 2, 1), growth_rate=4, num_init_features=8, num_classes=5), 64),
    "fractalnet20": (dict(channels=(8, 8, 16), drop_rates=(0.0, 0.1, 0.2), input_size=16), 16),
    "googlenet": (dict(aux_logits=False, num_classes=5), 64),
    "inception_v4": (dict(num_blocks=(1, 1, 1), num_classes=5), 75),
    "inception_resnet_v1": (dict(num_blocks=(1, 1, 1), num_classes=5), 75),
    "nasnet_a_cifar": (dict(num_normal_cells=1, penultimate_filters=96, aux_head=False), 16),
    "nasnet_a_mobile": (dict(num_normal_cells=1, penultimate_filters=96, aux_head=False, num_classes=5,
                             image_size=64), 64),
}
# one per kernel-backed layer (LRN, PreActConv2d, DenseConv2d) and per way of building a network
FAST = ["lenet5", "alexnet", "vgg11_bn", "resnet18", "preact_resnet164", "densenet121"]


def small(name: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    """The small model (seeded, eval mode) and a batch of 2 random inputs for it."""
    overrides, side = SMALL[name]
    torch.manual_seed(0)
    model = create(name, **{**overrides, **extra}).eval()
    x = torch.randn(2, model.in_chans, side, side)
    return model, x
