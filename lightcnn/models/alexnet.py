"""AlexNet (Krizhevsky, Sutskever, Hinton 2012, "ImageNet classification with deep convolutional neural
networks"), and the single-tower variant torchvision ships.

`alexnet` is the paper's network (section 3.5, Fig. 2): five convolutions split over two GPUs ("towers"),
so conv2, conv4 and conv5 only see the maps of their own tower (groups=2) while conv3 and the fully
connected layers see both; local response normalisation after the ReLUs of conv1 and conv2 (3.3);
overlapping 3x3/2 max-pooling (3.4); dropout 0.5 on the hidden FC layers (4.2); 227x227 crops (the
paper's "224" does not give its 55x55 maps with an 11x11/4 convolution). 60,965,224 parameters.

`alexnet_owt` is torchvision's `alexnet`: one tower with 64-192-384-256-256 maps (after Krizhevsky 2014,
"One weird trick"), no LRN, 224x224 input. Same layers and order as torchvision, so its weights load
with `lightcnn.models.weights.from_torchvision("alexnet_owt", tv_alexnet)`.

The same `AlexNet` class builds ZFNet (lightcnn.models.zfnet).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from lightcnn.layers import Impl, LocalResponseNorm
from lightcnn.models.base import Classifier, make_default_cfg, sequential_stages
from lightcnn.models.registry import register_model
from lightcnn.models.weights import map_layers_in_order, register_twin


class ConvSpec(NamedTuple):
    """One convolution of the feature extractor."""

    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1  # 2 = the two GPU towers of the paper


# Section 3.5: 96 11x11x3 /4, 256 5x5x48, 384 3x3x256, 384 3x3x192, 256 3x3x192.
ALEXNET_CONVS = (ConvSpec(96, 11, 4, 0, 1), ConvSpec(256, 5, 1, 2, 2), ConvSpec(384, 3, 1, 1, 1),
                 ConvSpec(384, 3, 1, 1, 2), ConvSpec(256, 3, 1, 1, 2))
# torchvision's single tower.
ALEXNET_OWT_CONVS = (ConvSpec(64, 11, 4, 2), ConvSpec(192, 5, 1, 2), ConvSpec(384, 3, 1, 1),
                     ConvSpec(256, 3, 1, 1), ConvSpec(256, 3, 1, 1))


class AlexNet(Classifier):
    """Five convolutions, three max-pools, optional LRN, and three fully connected layers.

    Args:
        num_classes: outputs of the last FC layer (1000 ImageNet classes in the paper).
        in_chans: input channels.
        convs: the five convolutions (out_channels, kernel_size, stride, padding, groups).
        pool_after: indices of the convolutions followed by 3x3/2 max-pooling (after their ReLU/LRN).
        ceil_mode: round pooled sizes up (ZFNet's 110/55/26/13/6 maps need it).
        lrn_after: indices of the convolutions whose ReLU output is normalised by LRN (empty: no LRN).
        pool_before_lrn: False: ReLU, LRN, pool (AlexNet, sections 3.3-3.4); True: ReLU, pool, LRN (ZFNet,
            section 2 and Fig. 3: the normalised maps are the pooled ones).
        lrn_size, lrn_alpha, lrn_beta, lrn_k: the LRN's n, alpha, beta, k in PyTorch's convention, where
            alpha is divided by n: the paper's k=2, n=5, alpha=1e-4, beta=0.75 is lrn_alpha=5e-4.
        pooled_size: side of the adaptive average pool before the classifier (6 at the native input
            size, where it does nothing; it lets other input sizes reach the same FC layers).
        hidden_features: width of the two hidden FC layers.
        drop_rate: dropout probability on the hidden FC layers.
        dropout_position: "after_fc" drops the outputs of fc6 and fc7 (the paper, "setting to zero the
            output of each hidden neuron", and Caffe); "before_fc" drops the inputs of fc6 and fc7
            (torchvision's order).
        init: "paper" (weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers, 0
            elsewhere; section 5), "zfnet" (weights N(0, 0.01), biases 0; Zeiler & Fergus section 3) or
            "pytorch" (PyTorch's defaults, as torchvision).
        impl: "auto", "kernel", "reference", or None (the global default, "auto") for the LRN.
        input_size: the native input side, recorded in `default_cfg`.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, convs: Sequence[ConvSpec] = ALEXNET_CONVS,
                 pool_after: Sequence[int] = (0, 1, 4), ceil_mode: bool = False, lrn_after: Sequence[int] = (0, 1),
                 pool_before_lrn: bool = False,
                 lrn_size: int = 5, lrn_alpha: float = 5e-4, lrn_beta: float = 0.75, lrn_k: float = 2.0,
                 pooled_size: int = 6, hidden_features: int = 4096, drop_rate: float = 0.5,
                 dropout_position: Literal["after_fc", "before_fc"] = "after_fc",
                 init: Literal["paper", "zfnet", "pytorch"] = "paper", impl: Impl | None = None,
                 input_size: int = 227):
        super().__init__()
        if dropout_position not in ("after_fc", "before_fc"):
            raise ValueError(f"dropout_position must be 'after_fc' or 'before_fc', got {dropout_position!r}")
        if init not in ("paper", "zfnet", "pytorch"):
            raise ValueError(f"init must be 'paper', 'zfnet' or 'pytorch', got {init!r}")
        convs = [ConvSpec(*c) for c in convs]
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, hidden_features
        self.features = nn.Sequential()
        c_in = in_chans
        for i, spec in enumerate(convs):
            n = i + 1
            self.features.add_module(f"conv{n}", nn.Conv2d(c_in, spec.out_channels, spec.kernel_size, spec.stride,
                                                            spec.padding, groups=spec.groups))
            self.features.add_module(f"relu{n}", nn.ReLU(inplace=True))
            # 3.3: "applied this normalization after applying the ReLU nonlinearity"; 3.4: overlapping pooling
            norm = ([(f"norm{n}", LocalResponseNorm(lrn_size, lrn_alpha, lrn_beta, lrn_k, impl=impl))]
                    if i in lrn_after else [])
            pool = [(f"pool{n}", nn.MaxPool2d(3, 2, ceil_mode=ceil_mode))] if i in pool_after else []
            for name, module in (pool + norm if pool_before_lrn else norm + pool):
                self.features.add_module(name, module)
            c_in = spec.out_channels
        self.avgpool = nn.AdaptiveAvgPool2d(pooled_size)

        def drop(name: str) -> list[tuple[str, nn.Module]]:
            return [(name, nn.Dropout(drop_rate))]

        before, after = dropout_position == "before_fc", dropout_position == "after_fc"
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        layers += drop("drop6") if before else []
        layers += [("fc6", nn.Linear(c_in * pooled_size**2, hidden_features)), ("relu6", nn.ReLU(inplace=True))]
        layers += drop("drop6") if after else []
        layers += drop("drop7") if before else []
        layers += [("fc7", nn.Linear(hidden_features, hidden_features)), ("relu7", nn.ReLU(inplace=True))]
        layers += drop("drop7") if after else []
        self.pre_logits = nn.Sequential(OrderedDict(layers))
        self.fc8 = nn.Linear(hidden_features, num_classes)
        self.default_cfg = make_default_cfg("imagenet", num_classes, in_chans, input_size)
        if init != "pytorch":
            self._init_normal(ones_bias=("conv2", "conv4", "conv5", "fc6", "fc7") if init == "paper" else ())

    @torch.no_grad()
    def _init_normal(self, ones_bias: Sequence[str]) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.01)
                # the paper's constant 1 "accelerates the early stages of learning by providing the ReLUs
                # with positive inputs"
                nn.init.constant_(m.bias, 1.0 if name.split(".")[-1] in ones_bias else 0.0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # N x 256 x 6 x 6 at the native size

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(self.avgpool(x))
        return x if pre_logits else self.fc8(x)

    classifier_name = "fc8"

    def stage_specs(self) -> list[tuple[str, int, int]]:
        return sequential_stages(self.features, "features", self.in_chans)


@register_model
def alexnet(**kwargs) -> AlexNet:
    """AlexNet as in the paper: two towers, LRN (k=2, n=5, alpha=1e-4 in the paper's convention), 227x227
    input."""
    model_args = dict(convs=ALEXNET_CONVS, lrn_after=(0, 1), init="paper", input_size=227)
    return AlexNet(**dict(model_args, **kwargs))


@register_model
def alexnet_owt(**kwargs) -> AlexNet:
    """torchvision's single-tower AlexNet (64-192-384-256-256, no LRN, 224x224)."""
    model_args = dict(convs=ALEXNET_OWT_CONVS, lrn_after=(), dropout_position="before_fc", init="pytorch",
                      input_size=224)
    return AlexNet(**dict(model_args, **kwargs))


def convert_torchvision_state_dict(model: AlexNet,
                                   state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """torchvision's alexnet numbers the layers of its Sequentials where ours carry the paper's names: the
    layers map in order, once the model is known to be single-tower and LRN-free like torchvision's."""
    if any(isinstance(m, nn.Conv2d) and m.groups != 1 for m in model.features) or any(
            isinstance(m, LocalResponseNorm) for m in model.modules()):
        raise ValueError("this AlexNet has grouped convolutions (two towers) or LRN, which torchvision's "
                         "single-tower alexnet lacks: import torchvision's weights into 'alexnet_owt' instead")
    return map_layers_in_order(model, state_dict)


register_twin("torchvision", "alexnet_owt", convert_torchvision_state_dict, classifier="fc8")
