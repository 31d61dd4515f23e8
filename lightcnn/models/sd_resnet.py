"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger 2016, "Deep Networks with Stochastic Depth").

A ResNet trained with randomly dropped residual blocks: block l survives a mini-batch with probability
p_l = 1 - l / L * (1 - p_L) (linear decay, p_L = 0.5), one gate per block per mini-batch; a dropped
block is the identity (its branch is not even computed), and at test time every branch is scaled by
its p_l. The gate lives in `resnet.py`'s blocks and acts only in training mode.

* `sd_resnet110`, `sd_resnet1202` (CIFAR): the authors' Torch code (main.lua, ResidualDrop.lua): 6n+2
  layers, every conv with a bias, shortcuts that average-pool 2x2/2 and append zero channels.
  1,732,010 parameters for n = 18 (ResNet-110's 1,727,962 plus 4,048 conv biases).
* `sd_resnet152` (ImageNet, Section 4): ResNet-152 as in fb.resnet.torch, which the authors built on:
  projection shortcuts, no conv biases, the stride in the bottleneck's 3x3 (v1.5) — the same
  architecture as torchvision's resnet152, whose weights therefore load into it.
"""
from __future__ import annotations

from typing import Literal, Sequence

from lightcnn.models.registry import register_model
from lightcnn.models.resnet import ResNet


class StochasticDepthResNet(ResNet):
    """ResNet with stochastic depth; the defaults are the paper's CIFAR ResNet-110.

    Args:
        layers: residual blocks per stage (CIFAR: n, n, n for depth 6n+2).
        p_L: survival probability of the last block (0.5 in the paper); 1.0 turns stochastic depth off.
        survival_rule: "linear" decay from 1 to p_L (the paper's choice) or "uniform" p_l = p_L.
        num_classes: classifier outputs (10 for CIFAR-10).
        in_chans: input image channels.
        block: "basic" (CIFAR) or "bottleneck" (ImageNet ResNet-152).
        widths: `planes` of each stage.
        stem: "cifar" (3x3 conv) or "imagenet" (7x7/2 conv + max-pool).
        stem_width: output channels of the stem conv.
        shortcut: "A" zero-pad (CIFAR code) or "B" projection (ImageNet).
        shortcut_pool: option A's downsampling: "avg" 2x2 average pool (the authors' code) or "subsample".
        conv_bias: biases on every conv (the authors' CIFAR code has them).
        stride_in_1x1: bottleneck only; False (fb.resnet.torch, v1.5) for the ImageNet model.
        zero_init_residual: start each block's last BN at gamma = 0 (off in the paper).
    """

    def __init__(
        self,
        layers: Sequence[int] = (18, 18, 18),
        p_L: float = 0.5,
        survival_rule: Literal["linear", "uniform"] = "linear",
        num_classes: int = 10,
        in_chans: int = 3,
        block: Literal["basic", "bottleneck"] = "basic",
        widths: Sequence[int] = (16, 32, 64),
        stem: Literal["imagenet", "cifar"] = "cifar",
        stem_width: int = 16,
        shortcut: Literal["A", "B", "C"] = "A",
        shortcut_pool: Literal["subsample", "avg"] = "avg",
        conv_bias: bool = True,
        stride_in_1x1: bool = False,
        zero_init_residual: bool = False,
    ):
        super().__init__(block=block, layers=layers, num_classes=num_classes, in_chans=in_chans, widths=widths,
                         stem=stem, stem_width=stem_width, shortcut=shortcut, shortcut_pool=shortcut_pool,
                         stride_in_1x1=stride_in_1x1, conv_bias=conv_bias, p_L=p_L,
                         survival_rule=survival_rule, zero_init_residual=zero_init_residual)


@register_model
def sd_resnet110(**kwargs) -> StochasticDepthResNet:
    """Stochastic-depth ResNet-110 (CIFAR, p_L = 0.5): 1,732,010 parameters; paper error 5.25% (C100 24.98%)."""
    return StochasticDepthResNet(**dict(dict(layers=(18, 18, 18)), **kwargs))


@register_model
def sd_resnet1202(**kwargs) -> StochasticDepthResNet:
    """Stochastic-depth ResNet-1202 (CIFAR, n = 200, p_L = 0.5): 19,466,090 parameters; paper error 4.91%.

    The authors' CIFAR code at `-N 200`: ResNet-1202's 19,421,274 parameters plus 44,816 conv biases.
    """
    return StochasticDepthResNet(**dict(dict(layers=(200, 200, 200)), **kwargs))


@register_model
def sd_resnet152(**kwargs) -> StochasticDepthResNet:
    """Stochastic-depth ResNet-152 (ImageNet, p_L = 0.5): 60,192,808 parameters, 11.514 GMACs (v1.5)."""
    args = dict(block="bottleneck", layers=(3, 8, 36, 3), widths=(64, 128, 256, 512), stem="imagenet",
                stem_width=64, shortcut="B", conv_bias=False, stride_in_1x1=False, num_classes=1000)
    return StochasticDepthResNet(**dict(args, **kwargs))
