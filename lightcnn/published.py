"""The numbers the models are held to, in one place: parameter counts, MACs and published accuracy.

Sources (see each entry's note): "tv"/"timm" = counted on torchvision 0.29 / timm 1.0 built without
weights; "paper" = the paper's table; "built" = counted on a reimplementation that follows the paper and
its official code; "derived" = worked out from a rule stated in the note. The tests assert the exact
parameter count and MACs within 1% for every model listed here, and `python -m lightcnn.compare` prints
the published accuracy beside what it measures. Every published error names its `source` (paper, table,
protocol); none is given where no paper reports one for the model and data set.

Conventions: parameters are trainable ones, in the model's default configuration; `params` excludes
the auxiliary classifier heads, `aux_params` counts them (so `create(name)` has params + aux_params and
`create(name, aux_logits=False)`, or the family's equivalent knob, has params); MACs are
`torch.utils.flop_counter.FlopCounterMode` FLOPs / 2
(convolutions and matmuls only), eval mode, batch 1, at `input_side`; `None` where no figure is known.
"""
from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    params: int | None  # trainable parameters of the network without its auxiliary heads
    gmacs: float | None  # at input_side, eval mode, batch 1
    input_side: int
    top1_err: float | None = None  # % error: CIFAR-10 test error for CIFAR models, ImageNet top-1 otherwise
    top5_err: float | None = None  # ImageNet top-5 error, %
    c100_err: float | None = None  # CIFAR-100 test error, %
    note: str = ""
    aux_params: int = 0  # parameters of the auxiliary classifier heads (GoogLeNet, NASNet), built by default
    source: str = ""  # where the error figures are published: paper, table (and the protocol where it matters)


# Where the CIFAR errors come from (test error %, CIFAR with the standard pad-crop-flip augmentation)
HE16 = "He, Zhang, Ren, Sun 2016 (CVPR, deep residual learning)"
WRN = "Zagoruyko & Komodakis 2016 (wide residual networks)"
RESNEXT = "Xie et al. 2017 (ResNeXt), Table 7"
SD = "Huang et al. 2016 (stochastic depth)"
DENSE = "Huang et al. 2017 (DenseNet), Table 2 (C10+, C100+)"
DENSE_IN = "Huang et al. 2017 (DenseNet), Table 3 (single crop, val)"
P = Published
MODELS: dict[str, Published] = {
    # --- ImageNet (1000 classes) ---------------------------------------------------------------------
    "alexnet": P(60_965_224, 0.724, 227, 40.7, 18.2, note="built, two towers with LRN; paper 60M",
                 source='Krizhevsky, Sutskever, Hinton 2012, Table 2 ("1 CNN", ILSVRC-2012 val)'),
    "alexnet_owt": P(61_100_840, 0.714, 224, note="tv single tower"),
    "zfnet": P(62_357_608, 1.168, 224, 38.4, 16.5, note="built, Fig. 3; padding 1 on conv1, ceil-mode pools",
               source='Zeiler & Fergus 2014, Table 2 ("1 convnet as per Fig. 3", val)'),
    "vgg11": P(132_863_336, 7.609, 224, note="tv"),
    "vgg13": P(133_047_848, 11.308, 224, note="tv"),
    "vgg16": P(138_357_544, 15.470, 224, 24.4, 7.2, note="tv; error multi-crop",
               source="Simonyan & Zisserman 2015, Table 5 (config D, multi-crop & dense, val)"),
    "vgg19": P(143_667_240, 19.632, 224, note="tv"),
    "vgg11_bn": P(132_868_840, 7.609, 224, note="tv"),
    "vgg13_bn": P(133_053_736, 11.308, 224, note="tv"),
    "vgg16_bn": P(138_365_992, 15.470, 224, note="tv"),
    "vgg19_bn": P(143_678_248, 19.632, 224, note="tv"),
    "googlenet": P(6_998_552, 1.583, 224, None, 10.07, aux_params=13_378_280 - 6_998_552,
                   note="built: true 5x5, LRN, biases, no BN; tv's differs (6,624,904 / 13,004,888)",
                   source="Szegedy et al. 2015, Table 3 (1 model, 1 crop, val)"),
    "resnet18": P(11_689_512, 1.814, 224, 27.88, note="tv params; MACs of the paper's v1",
                  source="He et al. 2016 (CVPR), Table 2 (10-crop, val; top-1 only)"),
    "resnet34": P(21_797_672, 3.664, 224, 24.52, 7.46, note="tv params; MACs of the paper's v1; option B shortcuts",
                  source="He et al. 2016 (CVPR), Table 3 (ResNet-34 B, 10-crop, val)"),
    "resnet50": P(25_557_032, 3.858, 224, 22.85, 6.71, note="v1 MACs (tv v1.5: 4.089); error 10-crop",
                  source="He et al. 2016 (CVPR), Table 3 (10-crop, val)"),
    "resnet101": P(44_549_160, 7.570, 224, 21.75, 6.05, note="v1 MACs (tv v1.5: 7.801)",
                   source="He et al. 2016 (CVPR), Table 3 (10-crop, val)"),
    "resnet152": P(60_192_808, 11.282, 224, 21.43, 5.71, note="v1 MACs (tv v1.5: 11.514)",
                   source="He et al. 2016 (CVPR), Table 3 (10-crop, val)"),
    "resnext50_32x4d": P(25_028_904, 4.230, 224, 22.2, note="tv (v1.5)",
                         source="Xie et al. 2017 (ResNeXt), Table 3 (224 single crop, val; top-1 only)"),
    "resnext101_32x8d": P(88_791_336, 16.414, 224, note="tv (v1.5)"),
    "sd_resnet152": P(60_192_808, 11.514, 224, note="derived: resnet152 v1.5 (fb.resnet.torch); gates add none"),
    "densenet121": P(7_978_856, 2.834, 224, 25.02, 7.71,
                     note="tv params; error: the paper's single crop (Table 3); torchvision's weights 25.57/8.03",
                     source=DENSE_IN),
    "densenet169": P(14_149_480, 3.360, 224, 23.80, 6.85, note="tv", source=DENSE_IN),
    "densenet201": P(20_013_928, 4.291, 224, 22.58, 6.34, note="tv", source=DENSE_IN),
    "densenet264": P(33_337_704, 5.752, 224, 22.15, 6.12, note="tv layout: growth 32, blocks 6,12,64,48",
                     source=DENSE_IN),
    "inception_v4": P(42_679_816, 12.254, 299, 20.0, 5.0, note="timm (TF-slim layout)",
                      source="Szegedy et al. 2017, Table 2 (single crop, val)"),
    "inception_resnet_v2": P(55_843_464, 13.156, 299, 19.9, 4.9, note="timm; 10/20/10 blocks, 320/1088/2080",
                             source="Szegedy et al. 2017, Table 2 (single crop, val)"),
    "inception_resnet_v2_paper": P(32_433_928, 9.258, 299, note="built: 5/10/5 blocks, 384/1152/2144"),
    "inception_resnet_v1": P(22_756_328, 6.206, 299, 21.3, 5.5, note="built: paper figures",
                             source="Szegedy et al. 2017, Table 2 (single crop, val)"),
    "nasnet_a_large": P(88_753_150, 23.783, 331, 17.3, 3.8, aux_params=4_567_784,
                        note="timm (no aux head); paper 88.9M, 23.8B",
                        source="Zoph et al. 2018, Table 2 (single crop, val)"),
    "nasnet_a_mobile": P(5_289_978, 0.5636, 224, 26.0, 8.4, aux_params=2_411_240, note="built; paper 5.3M, 564M",
                         source="Zoph et al. 2018, Table 3 (NASNet-A 4@1056, single crop, val)"),
    "zfnet_large": P(107_627_624, 2.477, 224, 37.5, 16.0, note="derived: zfnet with conv3-5 512/1024/512; Table 2 val",
                     source="Zeiler & Fergus 2014, Table 2 (larger conv3-5, val)"),
    # --- CIFAR (10 classes; CIFAR-100 adds 90 x (classifier input + 1)) ------------------------------
    "lenet5": P(61_706, 0.000417, 32, note="modern: dense C3, 10-way linear output; 32x32x1"),
    "lenet5_original": P(60_000, None, 32, note="paper: sparse C3 and fixed RBF output"),
    "resnet20": P(269_722, 0.0406, 32, 8.75, note="option A shortcuts", source=HE16 + ", Table 6"),
    "resnet32": P(464_154, None, 32, 7.51, source=HE16 + ", Table 6"),
    "resnet44": P(658_586, None, 32, 7.17, source=HE16 + ", Table 6"),
    "resnet56": P(853_018, 0.1255, 32, 6.97, source=HE16 + ", Table 6"),
    "resnet110": P(1_727_962, 0.2529, 32, 6.43, note="best of 5 runs; mean 6.61 +- 0.16",
                   source=HE16 + ", Table 6"),
    "resnet1202": P(19_421_274, 2.829, 32, 7.93, source=HE16 + ", Table 6"),
    "preact_resnet164": P(1_703_258, 0.2445, 32, 5.46, c100_err=24.33,
                          source="He et al. 2016 (ECCV, identity mappings), Table 3"),
    "preact_resnet1001": P(10_327_706, 1.488, 32, 4.62, c100_err=22.71,
                           note="C10 4.62 at batch 64 (Table 4; Table 3, batch 128: 4.92)",
                           source="He et al. 2016 (ECCV, identity mappings), Tables 3-4"),
    "wrn28_10": P(36_479_194, 5.243, 32, 4.00, c100_err=19.25, note="with dropout 0.3: 3.89 (C100 18.85)",
                  source=WRN + ", Table 5"),
    "wrn16_8": P(10_961_370, 1.548, 32, 4.27, c100_err=20.43, source=WRN + ", Table 5"),
    "wrn40_4": P(8_949_210, 1.299, 32, 4.53, c100_err=21.18, source=WRN + ", Table 5"),
    "resnext29_8x64d": P(34_426_698, 5.387, 32, 3.65, c100_err=17.77, source=RESNEXT),
    "resnext29_16x64d": P(68_155_210, 10.689, 32, 3.58, c100_err=17.31, source=RESNEXT),
    "sd_resnet110": P(1_732_010, 0.2529, 32, 5.25, c100_err=24.98,
                      note="authors' code: conv biases, avg-pool + zero-pad shortcut; MACs of resnet110",
                      source=SD + ", Table 1"),
    "sd_resnet1202": P(19_421_274 + 16 + 2 * 200 * (16 + 32 + 64), 2.829, 32, 4.91,
                       note="derived: resnet1202 plus one bias per conv output channel; MACs of resnet1202",
                       source=SD + ", Sec. 4 (ResNet-1202 on CIFAR-10)"),
    "densenet40_k12": P(1_019_722, 0.265, 32, 5.24, c100_err=24.42, source=DENSE),
    "densenet100_k12": P(6_979_642, None, 32, 4.10, c100_err=20.20, source=DENSE),
    "densenet_bc100_k12": P(769_162, 0.288, 32, 4.51, c100_err=22.27, source=DENSE),
    "densenet_bc250_k24": P(15_324_406, 5.419, 32, 3.62, c100_err=17.60, source=DENSE),
    "densenet_bc190_k40": P(25_624_430, 9.302, 32, 3.46, c100_err=17.18, source=DENSE),
    "fractalnet20": P(33_734_922, 0.845, 32, 4.60, c100_err=23.73,
                      note="with drop-path and dropout (without: 5.22, C100 23.30); built, affine BN (ours); "
                           "paper says 38.6M; the authors' generator, BN without scale/shift (bn_affine=False), "
                           "gives 33,714,314",
                      source="Larsson, Maire, Shakhnarovich 2017 (FractalNet), Table 1 (C10+, C100+)"),
    "nasnet_a_cifar": P(3_346_538, 0.544, 32, 3.41, aux_params=1_631_498,
                        note="6@768 as released: the first cell's h-1 is the stem output, untouched; paper 3.3M "
                             "(first_cell_prev='relu_conv_bn', ReLU-1x1-BN on that input: 3,328,234 / 0.526)",
                        source="Zoph et al. 2018, Table 1 (NASNet-A 6@768, no cutout)"),
}
del P, HE16, WRN, RESNEXT, SD, DENSE, DENSE_IN


def published(name: str) -> Published | None:
    """The published figures of a registered model, or None when there are none."""
    return MODELS.get(name)
