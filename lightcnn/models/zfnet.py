"""ZFNet (Zeiler & Fergus 2014, "Visualizing and understanding convolutional networks", Fig. 3).

AlexNet as the deconvnet visualisations corrected it: a 7x7/2 first layer instead of 11x11/4 (its
filters had aliasing and dead filters, section 4.1), a stride-2 conv2, and dense (one-tower) conv3-5 of
384/384/256 maps. The maps of Fig. 3 (110, 55, 26, 13, 6 at 224x224) need padding 1 on conv1 and
ceil-mode 3x3/2 pooling. Layers 1 and 2 pool first and then are "contrast normalised across feature
maps" (section 2, Fig. 3: the normalised maps are 55x55 and 13x13 at 224x224), the reverse of AlexNet's
LRN-then-pool; the normalisation is AlexNet's LRN (k=2, n=5, paper alpha 1e-4, beta 0.75), as the paper
gives no constants of its own.
62,357,608 parameters. Section 3.1's training trick, renormalising convolution filters whose RMS exceeds
0.1, is `renormalize_filters_`, to be called after each optimiser step.
"""
from __future__ import annotations

import torch
from torch import nn

from lightcnn.models.alexnet import AlexNet, ConvSpec
from lightcnn.models.registry import register_model

ZFNET_CONVS = (ConvSpec(96, 7, 2, 1), ConvSpec(256, 5, 2, 0), ConvSpec(384, 3, 1, 1), ConvSpec(384, 3, 1, 1),
               ConvSpec(256, 3, 1, 1))
# Fig. 3: overlapping 3x3/2 pools after conv1, conv2, conv5 (ceil mode gives 55/26/13/6), LRN after pooling.
ZFNET = dict(convs=ZFNET_CONVS, pool_after=(0, 1, 4), ceil_mode=True, lrn_after=(0, 1), pool_before_lrn=True,
             init="zfnet", input_size=224)


@register_model
def zfnet(**kwargs) -> AlexNet:
    """ZFNet of Fig. 3: 96@7x7/2, 256@5x5/2, 384, 384, 256 @3x3, maps 110/55/26/13/6; 62,357,608 parameters."""
    model_args = dict(ZFNET)
    return AlexNet(**dict(model_args, **kwargs))


@torch.no_grad()
def renormalize_filters_(model: nn.Module, radius: float = 0.1) -> int:
    """Section 3.1: "filters in convolutional layers whose RMS value exceeds a fixed radius of 10^-1 are
    renormalized to this fixed radius" (it kept the first layer's filters from dominating). Scales those
    filters of every nn.Conv2d of `model` in place; returns how many it rescaled."""
    rescaled = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            rms = m.weight.pow(2).mean(dim=tuple(range(1, m.weight.dim())), keepdim=True).sqrt()
            too_big = rms > radius * (1 + 1e-6)  # the tolerance keeps a second call from rescaling again
            m.weight.mul_(torch.where(too_big, radius / rms, torch.ones_like(rms)))
            rescaled += int(too_big.sum())
    return rescaled


ZFNET_LARGE_CONVS = ZFNET_CONVS[:2] + (ConvSpec(512, 3, 1, 1), ConvSpec(1024, 3, 1, 1), ConvSpec(512, 3, 1, 1))


@register_model
def zfnet_large(**kwargs) -> AlexNet:
    """ZFNet with conv3-5 of 512, 1024 and 512 maps (Table 2, the best single model: 37.5% / 16.0% val
    top-1 / top-5 error); otherwise Fig. 3. 107,627,624 parameters (weights + biases):
    conv1 3*7*7*96 + 96 = 14,208; conv2 96*5*5*256 + 256 = 614,656; conv3 256*3*3*512 + 512 = 1,180,160;
    conv4 512*3*3*1024 + 1024 = 4,719,616; conv5 1024*3*3*512 + 512 = 4,719,104;
    fc6 512*6*6*4096 + 4096 = 75,501,568; fc7 4096*4096 + 4096 = 16,781,312; fc8 4096*1000 + 1000 = 4,097,000."""
    model_args = dict(ZFNET, convs=ZFNET_LARGE_CONVS)
    return AlexNet(**dict(model_args, **kwargs))
