"""GoogLeNet (Szegedy et al. 2015, "Going deeper with convolutions"), as in the paper.

Table 1 and Fig. 3: a 7x7/2 convolution, 3x3/2 max-pool, LRN, 1x1 and 3x3 convolutions, LRN, 3x3/2
max-pool; Inception 3a-3b, max-pool, 4a-4e, max-pool, 5a-5b; 7x7 average pool, dropout 0.4, a linear
layer. Every convolution has a bias and a ReLU; there is no BatchNorm (torchvision's `googlenet` adds BN
and puts a 3x3 convolution in the "5x5" branch, so its weights do not fit here). The max-pools are 3x3/2
with rounding up, as in the reference Caffe model, which gives Table 1's 56/28/14/7 maps. Two auxiliary
classifiers sit on 4a and 4d (section 5): 5x5/3 average pool, 1x1 convolution to 128, FC 1024, dropout
0.7, FC; the training module adds their losses with weight 0.3 (its `aux_loss_weights`). 6,998,552
parameters without the auxiliary heads, 13,378,280 with them.

In training mode (with `aux_logits=True`) `forward` returns `GoogLeNetOutputs(logits, aux_logits2,
aux_logits1)`; in eval mode it returns the logits alone.

`googlenet_naive` replaces every Inception module by the naive module of Fig. 2(a): 1x1, 3x3 and 5x5
convolutions and a 3x3 max-pool side by side on the module's input, without the 1x1 reductions. Since
the pooling branch passes all its input maps on, the width grows from module to module (section 4), and
the network costs ~14x the parameters and ~8x the multiply-adds: what the bottlenecks save.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Literal, NamedTuple, Sequence

import torch
from torch import nn

from lightcnn.layers import Impl, LocalResponseNorm
from lightcnn.models.base import Classifier, init_caffe_xavier_, make_default_cfg, sequential_stages
from lightcnn.models.registry import register_model


class GoogLeNetOutputs(NamedTuple):
    """What GoogLeNet returns while training: the main logits and those of the heads on 4d and 4a."""

    logits: torch.Tensor
    aux_logits2: torch.Tensor
    aux_logits1: torch.Tensor


class InceptionSpec(NamedTuple):
    """One row of Table 1: the widths of an Inception module's branches."""

    n1x1: int
    n3x3_reduce: int
    n3x3: int
    n5x5_reduce: int
    n5x5: int
    pool_proj: int


# Table 1, in order; "pool" marks the 3x3/2 max-pools between stages.
GOOGLENET_MODULES: tuple[tuple[str, InceptionSpec | None], ...] = (
    ("inception3a", InceptionSpec(64, 96, 128, 16, 32, 32)),
    ("inception3b", InceptionSpec(128, 128, 192, 32, 96, 64)),
    ("pool3", None),
    ("inception4a", InceptionSpec(192, 96, 208, 16, 48, 64)),
    ("inception4b", InceptionSpec(160, 112, 224, 24, 64, 64)),
    ("inception4c", InceptionSpec(128, 128, 256, 24, 64, 64)),
    ("inception4d", InceptionSpec(112, 144, 288, 32, 64, 64)),
    ("inception4e", InceptionSpec(256, 160, 320, 32, 128, 128)),
    ("pool4", None),
    ("inception5a", InceptionSpec(256, 160, 320, 32, 128, 128)),
    ("inception5b", InceptionSpec(384, 192, 384, 48, 128, 128)),
)
AUX_AFTER = ("inception4a", "inception4d")  # section 5


def conv_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              padding: int = 0) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
                                     relu=nn.ReLU(inplace=True)))


class Inception(nn.Module):
    """Fig. 2(b): 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max-pool -> 1x1, concatenated over channels."""

    def __init__(self, in_channels: int, spec: InceptionSpec):
        super().__init__()
        self.branch1 = conv_relu(in_channels, spec.n1x1, 1)
        self.branch2 = nn.Sequential(conv_relu(in_channels, spec.n3x3_reduce, 1),
                                     conv_relu(spec.n3x3_reduce, spec.n3x3, 3, padding=1))
        self.branch3 = nn.Sequential(conv_relu(in_channels, spec.n5x5_reduce, 1),
                                     conv_relu(spec.n5x5_reduce, spec.n5x5, 5, padding=2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), conv_relu(in_channels, spec.pool_proj, 1))
        self.out_channels = spec.n1x1 + spec.n3x3 + spec.n5x5 + spec.pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionNaive(nn.Module):
    """Fig. 2(a): 1x1 | 3x3 | 5x5 | 3x3 max-pool on the input, concatenated; the reductions of `spec`
    are ignored and the pooled input passes through at full width."""

    def __init__(self, in_channels: int, spec: InceptionSpec):
        super().__init__()
        self.branch1 = conv_relu(in_channels, spec.n1x1, 1)
        self.branch2 = conv_relu(in_channels, spec.n3x3, 3, padding=1)
        self.branch3 = conv_relu(in_channels, spec.n5x5, 5, padding=2)
        self.branch4 = nn.MaxPool2d(3, 1, padding=1)
        self.out_channels = spec.n1x1 + spec.n3x3 + spec.n5x5 + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Section 5's auxiliary classifier: 5x5/3 average pool (4x4 maps on 14x14), 1x1 conv to 128 + ReLU,
    FC 1024 + ReLU, dropout 0.7, FC to the classes."""

    def __init__(self, in_channels: int, num_classes: int, drop_rate: float = 0.7):
        super().__init__()
        self.pool = nn.AvgPool2d(5, 3)
        self.conv = conv_relu(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.pool(x))  # N x 128 x 4 x 4
        x = self.dropout(self.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


class GoogLeNet(Classifier):
    """GoogLeNet of Table 1 with the paper's true 5x5 branches, LRN and auxiliary classifiers.

    Args:
        num_classes: outputs of the classifiers (1000 ImageNet classes in the paper).
        in_chans: input channels.
        modules: Table 1's Inception modules and pools (`GOOGLENET_MODULES`).
        inception: "bottleneck" (Fig. 2(b), the paper's network) or "naive" (Fig. 2(a), no 1x1 reductions).
        aux_logits: build the auxiliary classifiers on 4a and 4d (used in training mode only).
        drop_rate: dropout before the last linear layer (section 5: 0.4).
        aux_drop_rate: dropout in the auxiliary classifiers (section 5: 0.7).
        lrn: the two local response normalisations of the stem (Fig. 3).
        lrn_size, lrn_alpha, lrn_beta, lrn_k: their n, alpha (PyTorch's convention, divided by n), beta, k;
            the paper gives none, these are the reference Caffe model's (5, 1e-4, 0.75, 1).
        init: "caffe" (the reference BVLC Caffe model: Xavier-uniform weights U(+-sqrt(3 / fan_in)), biases
            0.2 in the convolutions and the auxiliary FC-1024 layers (loss1/fc, loss2/fc), 0 in the
            classifiers) or "pytorch" (PyTorch's defaults).
        impl: "auto", "kernel", "reference", or None (the global default, "auto") for the LRN.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 modules: Sequence[tuple[str, InceptionSpec | None]] = GOOGLENET_MODULES,
                 inception: Literal["bottleneck", "naive"] = "bottleneck", aux_logits: bool = True,
                 drop_rate: float = 0.4, aux_drop_rate: float = 0.7,
                 lrn: bool = True, lrn_size: int = 5,
                 lrn_alpha: float = 1e-4, lrn_beta: float = 0.75, lrn_k: float = 1.0,
                 init: Literal["caffe", "pytorch"] = "caffe", impl: Impl | None = None):
        super().__init__()
        blocks = {"bottleneck": Inception, "naive": InceptionNaive}
        if inception not in blocks:
            raise ValueError(f"inception must be 'bottleneck' or 'naive', got {inception!r}")
        if init not in ("caffe", "pytorch"):
            raise ValueError(f"init must be 'caffe' or 'pytorch', got {init!r}")
        self.num_classes, self.in_chans, self.aux_logits = num_classes, in_chans, aux_logits

        def norm(name: str) -> list[tuple[str, nn.Module]]:
            return [(name, LocalResponseNorm(lrn_size, lrn_alpha, lrn_beta, lrn_k, impl=impl))] if lrn else []

        self.stem = nn.Sequential(OrderedDict([
            ("conv1", conv_relu(in_chans, 64, 7, stride=2, padding=3)),  # N x 64 x 112 x 112
            ("pool1", nn.MaxPool2d(3, 2, ceil_mode=True)),  # N x 64 x 56 x 56
            *norm("norm1"),
            ("conv2_reduce", conv_relu(64, 64, 1)),
            ("conv2", conv_relu(64, 192, 3, padding=1)),  # N x 192 x 56 x 56
            *norm("norm2"),
            ("pool2", nn.MaxPool2d(3, 2, ceil_mode=True)),  # N x 192 x 28 x 28
        ]))
        self.blocks = nn.Sequential()
        self.aux = nn.ModuleDict()
        channels = 192
        for name, spec in modules:
            if spec is None:
                self.blocks.add_module(name, nn.MaxPool2d(3, 2, ceil_mode=True))  # 28 -> 14 -> 7
                continue
            block = blocks[inception](channels, spec)
            self.blocks.add_module(name, block)
            channels = block.out_channels
            if aux_logits and name in AUX_AFTER:
                self.aux[name] = InceptionAux(channels, num_classes, aux_drop_rate)
        self.num_features = channels  # 1024 for the paper's network
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the 7x7/1 average pool of Table 1
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)
        self.default_cfg = make_default_cfg("imagenet", num_classes, in_chans, 224)
        if init == "caffe":
            # BVLC train_val.prototxt: bias_filler 0.2 everywhere but the three classifiers (0)
            init_caffe_xavier_(self, bias=0.2, zero_bias={self.fc} | {aux.fc2 for aux in self.aux.values()})

    def _features(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)
        aux = []
        for name, block in self.blocks.named_children():
            x = block(x)
            if with_aux and name in self.aux:
                aux.append(self.aux[name](x))
        return x, aux  # N x 1024 x 7 x 7; [aux on 4a, aux on 4d]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, with_aux=False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def stage_specs(self) -> list[tuple[str, int, int]]:
        """conv1, conv2 and the last Inception module before each max-pool and at the end."""
        return (sequential_stages(self.stem, "stem", self.in_chans)[:2]
                + sequential_stages(self.blocks, "blocks", self.stem.conv2.conv.out_channels, 8))

    def aux_classifier_names(self) -> list[str]:
        return [f"aux.{name}.fc2" for name in self.aux]

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        with_aux = self.training and len(self.aux) > 0
        x, aux = self._features(x, with_aux)
        logits = self.forward_head(x)
        if with_aux:
            return GoogLeNetOutputs(logits, aux[1], aux[0])
        return logits


@register_model
def googlenet(**kwargs) -> GoogLeNet:
    """GoogLeNet as in the paper (true 5x5, LRN, biases, no BN, aux heads on 4a and 4d); 6,998,552
    parameters, 13,378,280 with the auxiliary classifiers."""
    model_args = dict(inception="bottleneck")
    return GoogLeNet(**dict(model_args, **kwargs))


@register_model
def googlenet_naive(**kwargs) -> GoogLeNet:
    """GoogLeNet built from the naive Inception module of Fig. 2(a) (no 1x1 reductions, the pooled input
    passed through), to show what the bottlenecks save."""
    model_args = dict(inception="naive")
    return GoogLeNet(**dict(model_args, **kwargs))
