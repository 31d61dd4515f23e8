"""Import torchvision's ResNet / ResNeXt weights into lightcnn's `ResNet`.

Works where the two architectures are equal: `resnet18`, `resnet34`, `resnet50/101/152` built with
`stride_in_1x1=False` (torchvision's v1.5: stride in the 3x3), `resnext50_32x4d`, `resnext101_32x8d`.
`sd_resnet152` has ResNet-152 v1.5's parameters but scales each branch by its survival probability in
eval, which torchvision's network does not: it accepts the weights only when built with `p_L=1.0`.
Nothing is downloaded here: pass a state_dict you already have, e.g.

    sd = torchvision.models.resnet50(weights="IMAGENET1K_V2").state_dict()   # or torch.load(path)
    model = resnet_from_torchvision("resnet50", sd)                           # v1.5, 1000 classes

or, for fine-tuning with another class count, `load_torchvision_state_dict(create("resnet50",
stride_in_1x1=False, num_classes=10), sd, load_classifier=False)`.

Our state-dict keys are torchvision's by design (`conv1`, `bn1`, `layerS.B.convK`, `layerS.B.downsample.0/1`,
`fc`); `convert_torchvision_state_dict` is the one place that would rename keys if that ever changed, and
`load_torchvision_state_dict` checks that the model really has torchvision's layout before loading, because
a v1 bottleneck has the same tensor shapes as v1.5 and would load silently but compute something else.
"""
from __future__ import annotations

from typing import Mapping

import torch

from lightcnn.models.registry import create
from lightcnn.models.resnet import ResNet

# lightcnn name -> the torchvision builder with the same architecture (with stride_in_1x1=False).
TORCHVISION_EQUIVALENTS = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
    "resnext50_32x4d": "resnext50_32x4d",
    "resnext101_32x8d": "resnext101_32x8d",
}

# torchvision key prefix -> ours. Empty: the keys coincide (kept as the single place to map them).
_KEY_RENAMES: dict[str, str] = {}


def convert_torchvision_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ResNet/ResNeXt state_dict's keys to lightcnn's (tensors are shared, not copied).

    A `module.` prefix left by (Distributed)DataParallel is removed.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        for old, new in _KEY_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def check_torchvision_layout(model: torch.nn.Module) -> None:
    """Raise ValueError unless `model` has torchvision's ResNet/ResNeXt architecture."""
    if not isinstance(model, ResNet):
        raise ValueError(f"torchvision ResNet weights load only into lightcnn ResNet models, got {type(model).__name__}")
    problems = []
    if model.stem != "imagenet":
        problems.append("stem must be 'imagenet' (7x7/2 conv + max-pool)")
    if model.shortcut != "B":
        problems.append("shortcut must be 'B' (projection where shapes change)")
    if model.conv_bias:
        problems.append("conv_bias must be False")
    if model.block == "bottleneck" and model.stride_in_1x1:
        problems.append("stride_in_1x1 must be False: torchvision's bottleneck is v1.5 (stride in the 3x3); "
                        "build the model with create(name, stride_in_1x1=False)")
    if any(b.survival_prob < 1.0 for b in model.residual_blocks()):
        problems.append("every block's survival probability must be 1: stochastic depth scales the branches "
                        "in eval, torchvision's network does not; build the model with p_L=1.0 "
                        "(or call model.set_stochastic_depth(1.0) first)")
    if problems:
        raise ValueError("this model's architecture differs from torchvision's: " + "; ".join(problems))


def load_torchvision_state_dict(model: ResNet, state_dict: Mapping[str, torch.Tensor],
                                load_classifier: bool = True) -> ResNet:
    """Load a torchvision ResNet/ResNeXt state_dict into `model` (in place; returns it).

    Args:
        model: a lightcnn ResNet with torchvision's layout (see `check_torchvision_layout`).
        state_dict: torchvision's `model.state_dict()` (or a checkpoint file's contents).
        load_classifier: False keeps the model's own `fc` (e.g. another class count for fine-tuning).
    """
    check_torchvision_layout(model)
    ours = model.state_dict()
    theirs = convert_torchvision_state_dict(state_dict)
    if not load_classifier:
        theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
        ours = {k: v for k, v in ours.items() if not k.startswith("fc.")}
    missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or unexpected:
        raise ValueError(f"state_dict does not match {type(model).__name__}(layers={model.layers}, "
                         f"cardinality={model.cardinality}): missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
                         "is it the state_dict of the torchvision model listed in TORCHVISION_EQUIVALENTS?")
    bad = [f"{k}: {tuple(theirs[k].shape)} vs ours {tuple(v.shape)}" for k, v in ours.items() if theirs[k].shape != v.shape]
    if bad:
        hint = (" The classifier differs: build the model with num_classes="
                f"{theirs['fc.weight'].shape[0]} or pass load_classifier=False.") if all(b.startswith("fc.") for b in bad) else ""
        raise ValueError(f"shape mismatch for {len(bad)} tensors: {bad[:3]}.{hint}")
    model.load_state_dict(theirs, strict=load_classifier)
    return model


def resnet_from_torchvision(name: str, state_dict: Mapping[str, torch.Tensor], **overrides) -> ResNet:
    """Build lightcnn model `name` in torchvision's layout, with the class count of `state_dict`'s
    classifier, and load the weights."""
    if name not in TORCHVISION_EQUIVALENTS:
        raise ValueError(f"no torchvision equivalent for {name!r}; importable: {sorted(TORCHVISION_EQUIVALENTS)}")
    fc = convert_torchvision_state_dict(state_dict).get("fc.weight")
    if fc is None:
        raise ValueError("state_dict has no 'fc.weight': is it a torchvision ResNet/ResNeXt state_dict?")
    overrides.setdefault("num_classes", fc.shape[0])
    overrides.setdefault("stride_in_1x1", False)
    return load_torchvision_state_dict(create(name, **overrides), state_dict)
