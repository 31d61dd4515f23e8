"""The numbers the models are held to, in one place: parameter counts, MACs and published accuracy.

Sources (see each entry's note): "tv"/"timm" = counted on torchvision 0.29 / timm 1.0 built without
weights; "paper" = the paper's table; "built" = counted on a reimplementation that follows the paper and
its official code; "derived" = worked out from a rule stated in the note. The tests assert the exact
parameter count and MACs within 1% for every model listed here, and `python -m lightcnn.compare` prints
the published accuracy beside what it measures.

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


P = Published
MODELS: dict[str, Published] = {
    # --- ImageNet (1000 classes) ---------------------------------------------------------------------
    "alexnet": P(60_965_224, 0.724, 227, 40.7, 18.2, note="built, two towers with LRN; paper 60M"),
    "alexnet_owt": P(61_100_840, 0.714, 224, note="tv single tower"),
    "zfnet": P(62_357_608, 1.168, 224, note="built, Fig. 3; padding 1 on conv1, ceil-mode pools"),
    "vgg11": P(132_863_336, 7.609, 224, note="tv"),
    "vgg13": P(133_047_848, 11.308, 224, note="tv"),
    "vgg16": P(138_357_544, 15.470, 224, 24.4, 7.2, note="tv; error multi-crop"),
    "vgg19": P(143_667_240, 19.632, 224, note="tv"),
    "vgg11_bn": P(132_868_840, 7.609, 224, note="tv"),
    "vgg13_bn": P(133_053_736, 11.308, 224, note="tv"),
    "vgg16_bn": P(138_365_992, 15.470, 224, note="tv"),
    "vgg19_bn": P(143_678_248, 19.632, 224, note="tv"),
    "googlenet": P(6_998_552, 1.583, 224, None, 10.07, aux_params=13_378_280 - 6_998_552,
                   note="built: true 5x5, LRN, biases, no BN; tv's differs (6,624,904 / 13,004,888)"),
    "resnet18": P(11_689_512, 1.814, 224, note="tv params; MACs of the paper's v1"),
    "resnet34": P(21_797_672, 3.664, 224, note="tv params; MACs of the paper's v1"),
    "resnet50": P(25_557_032, 3.858, 224, 22.85, 6.71, note="v1 MACs (tv v1.5: 4.089); error 10-crop"),
    "resnet101": P(44_549_160, 7.570, 224, note="v1 MACs (tv v1.5: 7.801)"),
    "resnet152": P(60_192_808, 11.282, 224, note="v1 MACs (tv v1.5: 11.514)"),
    "resnext50_32x4d": P(25_028_904, 4.230, 224, note="tv (v1.5)"),
    "resnext101_32x8d": P(88_791_336, 16.414, 224, note="tv (v1.5)"),
    "sd_resnet152": P(60_192_808, 11.514, 224, note="derived: resnet152 v1.5 (fb.resnet.torch); gates add none"),
    "densenet121": P(7_978_856, 2.834, 224, 25.02, 7.71,
                     note="tv params; error: the paper's single crop (Table 3); torchvision's weights 25.57/8.03"),
    "densenet169": P(14_149_480, 3.360, 224, note="tv"),
    "densenet201": P(20_013_928, 4.291, 224, note="tv"),
    "densenet264": P(33_337_704, 5.752, 224, note="tv layout: growth 32, blocks 6,12,64,48"),
    "inception_v4": P(42_679_816, 12.254, 299, note="timm (TF-slim layout)"),
    "inception_resnet_v2": P(55_843_464, 13.156, 299, 19.9, 4.9, note="timm; 10/20/10 blocks, 320/1088/2080"),
    "inception_resnet_v2_paper": P(32_433_928, 9.258, 299, note="built: 5/10/5 blocks, 384/1152/2144"),
    "inception_resnet_v1": P(22_756_328, 6.206, 299, note="built: paper figures"),
    "nasnet_a_large": P(88_753_150, 23.783, 331, 17.3, 3.8, aux_params=4_567_784,
                        note="timm (no aux head); paper 88.9M, 23.8B"),
    "nasnet_a_mobile": P(5_289_978, 0.5636, 224, aux_params=2_411_240, note="built; paper 5.3M, 564M"),
    "zfnet_large": P(107_627_624, 2.477, 224, 37.5, 16.0, note="derived: zfnet with conv3-5 512/1024/512; Table 2 val"),
    # --- CIFAR (10 classes; CIFAR-100 adds 90 x (classifier input + 1)) ------------------------------
    "lenet5": P(61_706, 0.000417, 32, note="modern: dense C3, 10-way linear output; 32x32x1"),
    "lenet5_original": P(60_000, None, 32, note="paper: sparse C3 and fixed RBF output"),
    "resnet20": P(269_722, 0.0406, 32, note="option A shortcuts"),
    "resnet32": P(464_154, None, 32),
    "resnet44": P(658_586, None, 32),
    "resnet56": P(853_018, 0.1255, 32),
    "resnet110": P(1_727_962, 0.2529, 32, 6.43),
    "resnet1202": P(19_421_274, 2.829, 32),
    "preact_resnet164": P(1_703_258, 0.2445, 32, 5.46, c100_err=24.33),
    "preact_resnet1001": P(10_327_706, 1.488, 32, 4.62, c100_err=22.71),
    "wrn28_10": P(36_479_194, 5.243, 32, 4.00, c100_err=19.25, note="with dropout 0.3: 3.89 (C100 18.85)"),
    "wrn16_8": P(10_961_370, 1.548, 32),
    "wrn40_4": P(8_949_210, 1.299, 32),
    "resnext29_8x64d": P(34_426_698, 5.387, 32, 3.65, c100_err=17.77),
    "resnext29_16x64d": P(68_155_210, 10.689, 32, 3.58, c100_err=17.31),
    "sd_resnet110": P(1_732_010, 0.2529, 32, 5.25, c100_err=24.98,
                      note="authors' code: conv biases, avg-pool + zero-pad shortcut; MACs of resnet110"),
    "sd_resnet1202": P(19_421_274 + 16 + 2 * 200 * (16 + 32 + 64), 2.829, 32, 4.91,
                       note="derived: resnet1202 plus one bias per conv output channel; MACs of resnet1202"),
    "densenet40_k12": P(1_019_722, 0.265, 32),
    "densenet100_k12": P(6_979_642, None, 32),
    "densenet_bc100_k12": P(769_162, 0.288, 32, 4.51, c100_err=22.27),
    "densenet_bc250_k24": P(15_324_406, 5.419, 32),
    "densenet_bc190_k40": P(25_624_430, 9.302, 32, 3.46, c100_err=17.18),
    "fractalnet20": P(33_734_922, 0.845, 32, 4.60, c100_err=23.73,
                      note="built, affine BN (ours); paper says 38.6M; the authors' generator, BN without "
                           "scale/shift (bn_affine=False), gives 33,714,314"),
    "nasnet_a_cifar": P(3_346_538, 0.544, 32, 3.41, aux_params=1_631_498,
                        note="6@768 as released: the first cell's h-1 is the stem output, untouched; paper 3.3M "
                             "(first_cell_prev='relu_conv_bn', ReLU-1x1-BN on that input: 3,328,234 / 0.526)"),
}
del P


def published(name: str) -> Published | None:
    """The published figures of a registered model, or None when there are none."""
    return MODELS.get(name)
