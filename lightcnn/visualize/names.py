"""Layers named as the papers name them, where the family knows: LeNet-5's C1, S2, C3, S4, C5, F6
(LeCun et al. 1998, Fig. 2) and AlexNet/ZFNet's conv1..conv5, fc6, fc7 (Krizhevsky et al. 2012; Zeiler &
Fergus 2014). The pictures label layers with these names and `--layers` accepts them.

A paper's layer is the map after its squashing function (the tanh of LeNet-5, the ReLU of AlexNet):
that is the module named after the layer; the bare convolution is "C3 (pre-activation)" /
"conv5 (pre-ReLU)". Other families show their module names (`model.named_modules()`).
"""
from __future__ import annotations

from torch import nn

# module name -> paper name, per model class
PAPER_NAMES: dict[str, dict[str, str]] = {
    "LeNet5": {
        "features.0": "C1 (pre-activation)", "features.1": "C1", "features.2": "S2",
        "features.3": "C3 (pre-activation)", "features.4": "C3", "features.5": "S4",
        "features.6": "C5 (pre-activation)", "features.7": "C5",
        "fc.1": "F6 (pre-activation)", "fc.2": "F6", "classifier": "output",
    },
    "LeNet5Original": {
        "features.c1": "C1 (pre-activation)", "features.act1": "C1", "features.s2": "S2 (pre-activation)",
        "features.act2": "S2", "features.c3": "C3 (pre-activation)", "features.act3": "C3",
        "features.s4": "S4 (pre-activation)", "features.act4": "S4", "features.c5": "C5 (pre-activation)",
        "features.act5": "C5", "f6.1": "F6 (pre-activation)", "f6.2": "F6", "output": "output (RBF)",
    },
    "AlexNet": {  # AlexNet, its one-tower variant, ZFNet
        **{f"features.conv{n}": f"conv{n} (pre-ReLU)" for n in range(1, 6)},
        **{f"features.relu{n}": f"conv{n}" for n in range(1, 6)},
        **{f"features.pool{n}": f"pool{n}" for n in range(1, 6)},
        **{f"features.norm{n}": f"norm{n}" for n in range(1, 6)},
        "pre_logits.fc6": "fc6 (pre-ReLU)", "pre_logits.relu6": "fc6",
        "pre_logits.fc7": "fc7 (pre-ReLU)", "pre_logits.relu7": "fc7", "fc8": "fc8",
    },
}


def paper_names(model: nn.Module) -> dict[str, str]:
    """{module name: paper name} of the layers of `model` that its family names (empty for the others)."""
    table = PAPER_NAMES.get(type(model).__name__, {})
    modules = dict(model.named_modules())
    return {k: v for k, v in table.items() if k in modules}


def label(model: nn.Module, name: str) -> str:
    """The paper's name of module `name` with the module name beside it ("C3 (features.4)"), or the module
    name where the family names no layers."""
    paper = paper_names(model).get(name)
    return f"{paper} [{name}]" if paper else name


def short_label(model: nn.Module, name: str) -> str:
    """The paper's name alone where there is one, else the last part of the module name ("relu5") or the
    whole name when that is a number ("features.4")."""
    paper = paper_names(model).get(name)
    if paper:
        return paper
    last = name.split(".")[-1]
    return name if last.isdigit() else last


def from_paper_name(model: nn.Module, name: str) -> str | None:
    """The module name of a paper's layer name (case-insensitive: "c3", "C3", "conv5"), or None."""
    for module, paper in paper_names(model).items():
        if paper.lower() == name.lower():
            return module
    return None
