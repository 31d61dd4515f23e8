"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998, "Gradient-based learning applied to document recognition").

`lenet5` is the form everyone trains today: dense C3, tanh, average-pool subsampling, a 10-way linear
output, on 32x32 grey images.

`lenet5_original` is the network of section II-B as drawn in Fig. 2: a sparse C3 (Table I), subsampling
layers with one trainable coefficient and one trainable bias per map, the scaled squashing function
f(a) = 1.7159 tanh(2a/3) (Appendix A) after every layer up to F6, and an output layer of Euclidean RBF
units whose centres are fixed +-1 codes (section II-B). Its 60,000 trainable parameters are the paper's:
C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6 10,164.

Input normalisation (`default_cfg`, which `lightcnn.data.DigitsDataModule` applies unless a recipe sets
mean/std): `lenet5` takes the digits data set's 0.5/0.5; `lenet5_original` the paper's levels (section
II-B: background -0.1, ink 1.175, so that the inputs have mean ~0 and variance ~1, which its scaled tanh
and +-2.4/F_i initialisation assume).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.models.base import Classifier, make_default_cfg
from lightcnn.models.registry import register_model

# Section II-B: inputs are normalised so that the background (0) is -0.1 and the ink (1) is 1.175:
# (x - mean) / std with std = 1 / 1.275, mean = 0.1 std.
PAPER_MEAN, PAPER_STD = (0.1 / 1.275,), (1 / 1.275,)

# Table I: which S2 maps (rows) each C3 map (column) reads. Maps 0-5 take 3 contiguous S2 maps, 6-11 take 4
# contiguous ones, 12-14 take 4 discontinuous ones, and 15 takes all six ("breaks the symmetry", II-B).
C3_CONNECTIONS: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (0, 4, 5), (0, 1, 5),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (0, 3, 4, 5), (0, 1, 4, 5), (0, 1, 2, 5),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)

# The RBF centres of the digits: "a stylized image of the corresponding character class drawn on a 7x12
# bitmap (hence the number 84)" (II-B). The paper prints them (Fig. 3) but ships no data; these are our
# drawing of the ten digits in that style ('#' = +1, '.' = -1).
DIGIT_BITMAPS: tuple[str, ...] = (
    ".......|..###..|.#...#.|#.....#|#.....#|#.....#|#.....#|#.....#|#.....#|.#...#.|..###..|.......",
    ".......|...#...|..##...|.#.#...|...#...|...#...|...#...|...#...|...#...|...#...|.#####.|.......",
    ".......|..###..|.#...#.|#.....#|......#|.....#.|....#..|...#...|..#....|.#.....|#######|.......",
    ".......|.#####.|#.....#|......#|......#|...###.|......#|......#|......#|#.....#|.#####.|.......",
    ".......|.....#.|....##.|...#.#.|..#..#.|.#...#.|#....#.|#######|.....#.|.....#.|.....#.|.......",
    ".......|#######|#......|#......|######.|......#|......#|......#|......#|#.....#|.#####.|.......",
    ".......|..####.|.#.....|#......|#......|######.|#.....#|#.....#|#.....#|#.....#|.#####.|.......",
    ".......|#######|......#|.....#.|....#..|...#...|...#...|..#....|..#....|..#....|..#....|.......",
    ".......|.#####.|#.....#|#.....#|#.....#|.#####.|#.....#|#.....#|#.....#|#.....#|.#####.|.......",
    ".......|.#####.|#.....#|#.....#|#.....#|#.....#|.######|......#|......#|.....#.|.####..|.......",
)


class LeNet5(Classifier):
    """LeNet-5 with a dense C3.

    Args:
        num_classes: output classes (10 digits in the paper).
        in_chans: input channels (1: grey images).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, 84
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5), nn.Tanh(), nn.AvgPool2d(2),  # C1, S2: 6 x 14 x 14
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),  # C3, S4: 16 x 5 x 5
            nn.Conv2d(16, 120, 5), nn.Tanh(),  # C5: 120 x 1 x 1
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), nn.Tanh())  # F6
        self.classifier = nn.Linear(84, num_classes)
        self.default_cfg = make_default_cfg("digits", num_classes, in_chans)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc(x)
        return x if pre_logits else self.classifier(x)

    classifier_name = "classifier"

    def stage_specs(self) -> list[tuple[str, int, int]]:
        return [("features.2", 6, 2), ("features.5", 16, 4), ("features.7", 120, 4)]  # S2, S4, C5


class ScaledTanh(nn.Module):
    """f(a) = A tanh(S a) with A = 1.7159, S = 2/3 (Appendix A): f(+-1) = +-1, where f'' peaks."""

    def __init__(self, amplitude: float = 1.7159, slope: float = 2.0 / 3.0):
        super().__init__()
        self.amplitude, self.slope = amplitude, slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.tanh(self.slope * x)

    def extra_repr(self) -> str:
        return f"amplitude={self.amplitude}, slope={self.slope:.4f}"


class Subsampling(nn.Module):
    """S-layer of II-B: the sum of each 2x2 block, times a trainable coefficient, plus a trainable bias,
    per feature map (2 parameters per map)."""

    def __init__(self, channels: int, kernel_size: int = 2):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, self.kernel_size) * self.kernel_size**2  # the sum of the receptive field
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SparseConv2d(nn.Module):
    """A convolution in which output map j reads only the input maps `connections[j]` (Table I).

    Only the connections that exist have parameters. Maps with the same fan-in run as one grouped
    convolution over a gathered copy of their inputs, so the whole layer is a few dense kernels.
    """

    def __init__(self, connections: Sequence[Sequence[int]], kernel_size: int):
        super().__init__()
        self.connections = tuple(tuple(int(i) for i in c) for c in connections)
        self.out_channels = len(self.connections)
        fan_ins = list(dict.fromkeys(len(c) for c in self.connections))  # distinct fan-ins, first-seen order
        self.convs = nn.ModuleDict()
        order: list[int] = []
        for f in fan_ins:
            maps = [j for j, c in enumerate(self.connections) if len(c) == f]
            order += maps
            gather = torch.tensor([i for j in maps for i in self.connections[j]])
            self.register_buffer(f"gather_{f}", gather, persistent=False)
            self.convs[f"fan_in_{f}"] = nn.Conv2d(len(maps) * f, len(maps), kernel_size, groups=len(maps))
        # the grouped outputs come in `order`; put them back in table order if that differs
        inverse = torch.argsort(torch.tensor(order))
        self.register_buffer("inverse", None if order == sorted(order) else inverse, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [conv(x.index_select(1, getattr(self, "gather_" + name[len("fan_in_"):])))
                for name, conv in self.convs.items()]
        out = torch.cat(outs, 1)
        return out if self.inverse is None else out.index_select(1, self.inverse)


class EuclideanRBF(nn.Module):
    """Output layer of II-B: y_i = sum_j (x_j - w_ij)^2 with fixed centres w (a buffer, not trained).

    Returns -y as logits, so that the arg-max is the nearest centre and cross-entropy on these logits is
    the paper's discriminative criterion (eq. 9) without the "rubbish" class constant j.
    """

    def __init__(self, centres: torch.Tensor):
        super().__init__()
        self.register_buffer("centres", centres)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x.unsqueeze(1) - self.centres).pow(2).sum(-1)


def make_rbf_centres(num_classes: int, num_features: int = 84, kind: str = "bitmap") -> torch.Tensor:
    """+-1 codes of the RBF units: the digit bitmaps for 10 classes of 84 features, else random
    (the paper: "chosen at random with equal probabilities for -1 and +1"), from a fixed seed."""
    if kind == "bitmap":
        if num_classes != 10 or num_features != 84:
            raise ValueError(
                f"rbf_centres='bitmap' draws the 10 digits on 7x12 bitmaps (84 features); got num_classes="
                f"{num_classes}, num_features={num_features}: use rbf_centres='random' for other class sets"
            )
        rows = [[1.0 if ch == "#" else -1.0 for ch in bitmap.replace("|", "")] for bitmap in DIGIT_BITMAPS]
        return torch.tensor(rows)
    if kind == "random":
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 2, (num_classes, num_features), generator=g).float() * 2 - 1
    raise ValueError(f"rbf_centres must be 'bitmap' or 'random', got {kind!r}")


class LeNet5Original(Classifier):
    """LeNet-5 as in the 1998 paper (section II-B, Fig. 2).

    Args:
        num_classes: RBF output units (10 digits in the paper).
        in_chans: input channels (1: grey images, normalised to background -0.1, ink 1.175).
        connections: Table I, the S2 maps each C3 map reads (16 tuples).
        rbf_centres: "bitmap" (the 10 digits drawn on 7x12 bitmaps, +-1), "random" (seeded +-1 codes,
            any class count), or None: "bitmap" for 10 classes, "random" otherwise.
        init: "paper" (weights and biases uniform in +-2.4 / fan-in, section IV) or "pytorch" (defaults).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1,
                 connections: Sequence[Sequence[int]] = C3_CONNECTIONS,
                 rbf_centres: Literal["bitmap", "random"] | None = None,
                 init: Literal["paper", "pytorch"] = "paper"):
        super().__init__()
        if init not in ("paper", "pytorch"):
            raise ValueError(f"init must be 'paper' or 'pytorch', got {init!r}")
        if any(i < 0 or i >= 6 for c in connections for i in c) or any(len(c) == 0 for c in connections):
            raise ValueError(
                f"connections must list, for each C3 map, a non-empty subset of the 6 S2 maps; got {connections!r}")
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, 84
        act = ScaledTanh
        self.features = nn.Sequential()
        self.features.add_module("c1", nn.Conv2d(in_chans, 6, 5))  # 6 x 28 x 28
        self.features.add_module("act1", act())
        self.features.add_module("s2", Subsampling(6))  # 6 x 14 x 14
        self.features.add_module("act2", act())
        self.features.add_module("c3", SparseConv2d(connections, 5))  # 16 x 10 x 10
        self.features.add_module("act3", act())
        self.features.add_module("s4", Subsampling(len(connections)))  # 16 x 5 x 5
        self.features.add_module("act4", act())
        self.features.add_module("c5", nn.Conv2d(len(connections), 120, 5))  # 120 x 1 x 1
        self.features.add_module("act5", act())
        self.f6 = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), act())
        if rbf_centres is None:
            rbf_centres = "bitmap" if num_classes == 10 else "random"
        self.output = EuclideanRBF(make_rbf_centres(num_classes, 84, rbf_centres))
        self.default_cfg = make_default_cfg("digits", num_classes, in_chans, mean=PAPER_MEAN, std=PAPER_STD)
        if init == "paper":
            self._init_paper()

    @torch.no_grad()
    def _init_paper(self) -> None:
        # Section IV-A (and Appendix A): "uniform distribution between -2.4/F_i and 2.4/F_i, where F_i is
        # the number of inputs (fan-in) of the unit".
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
                nn.init.uniform_(m.bias, -2.4 / fan_in, 2.4 / fan_in)
            elif isinstance(m, Subsampling):
                fan_in = m.kernel_size**2
                nn.init.uniform_(m.weight, -2.4 / fan_in, 2.4 / fan_in)
                nn.init.uniform_(m.bias, -2.4 / fan_in, 2.4 / fan_in)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.f6(x)
        return x if pre_logits else self.output(x)

    classifier_name = "output"

    def stage_specs(self) -> list[tuple[str, int, int]]:
        return [("features.act2", 6, 2), ("features.act4", self.features.c5.in_channels, 4),
                ("features.act5", 120, 4)]  # S2, S4, C5

    def new_classifier(self, old: nn.Module, num_classes: int) -> nn.Module:
        """RBF units with random +-1 centres (the paper's choice beyond its 10 digit bitmaps)."""
        return EuclideanRBF(make_rbf_centres(num_classes, self.num_features, "random")).to(self.f6[1].weight.device)


@register_model
def lenet5(**kwargs) -> LeNet5:
    """LeNet-5 as trained today: dense C3, tanh, average pooling, linear output."""
    model_args = dict(num_classes=10, in_chans=1)
    return LeNet5(**dict(model_args, **kwargs))


@register_model
def lenet5_original(**kwargs) -> LeNet5Original:
    """LeNet-5 as in LeCun et al. 1998: sparse C3 (Table I), trainable subsampling, scaled tanh, RBF
    output with fixed centres; 60,000 trainable parameters."""
    model_args = dict(num_classes=10, in_chans=1, init="paper")
    return LeNet5Original(**dict(model_args, **kwargs))
