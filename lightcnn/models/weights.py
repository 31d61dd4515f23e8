"""Import of other libraries' weights, one entry point per library: `from_torchvision`, `from_timm`.

    import torchvision
    from lightcnn.models.weights import from_timm, from_torchvision
    tv = torchvision.models.vgg16(weights="IMAGENET1K_V1")          # a module or its state_dict
    model = from_torchvision("vgg16", tv)                            # same outputs as tv in eval mode
    head = from_torchvision("resnet50", tv_sd, num_classes=10, load_classifier=False)   # fine-tuning
    model = from_timm("inception_v4", timm.create_model("inception_v4", pretrained=True))

Each family file says how its weights map, beside its layers (as torchvision's `densenet._load_state_dict`),
and registers its twins in one line:

    register_twin("torchvision", "vgg16", map_layers_in_order, classifier="fc8")

`convert(model, state_dict)` returns the state_dict under our keys (or raises a ValueError saying what
differs); the keyword overrides are what `create` needs to build the twin's layout (e.g. ResNet's
`stride_in_1x1=False`). `TWINS` is the one list of what can be imported: `twins("torchvision")`,
`twins("timm")` (Inception-v4 and Inception-ResNet-v2 map layer by layer in order, our TF-slim names against
timm's numbered modules; NASNet-A Large by its converter).
Nothing is downloaded here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn

StateDict = Mapping[str, torch.Tensor]


class Twin(NamedTuple):
    # (our model, their state_dict) -> their tensors under our names; reads only the model's structure (names,
    # configuration), which load_twin gives it as a meta-device build
    convert: Callable[[nn.Module, StateDict], StateDict]
    classifier: str  # our classifier's module name (its entries are left out with load_classifier=False)
    overrides: dict  # create() arguments that give the other library's layout


TWINS: dict[tuple[str, str], Twin] = {}  # (library, lightcnn model name) -> how to import its weights


def register_twin(library: str, name: str, convert: Callable[[nn.Module, StateDict], StateDict],
                  classifier: str = "fc", **overrides) -> None:
    """Declare that `library`'s network equal to lightcnn's `name` can be imported with `convert`."""
    if (library, name) in TWINS:
        raise ValueError(f"a {library} twin of {name!r} is registered twice")
    TWINS[(library, name)] = Twin(convert, classifier, overrides)


def twins(library: str) -> list[str]:
    """The lightcnn models whose weights `library` can provide, sorted."""
    import lightcnn.models  # noqa: F401  (the family files register their twins on import)

    return sorted(n for lib, n in TWINS if lib == library)


def map_layers_in_order(model: nn.Module, state_dict: StateDict) -> "OrderedDict[str, torch.Tensor]":
    """Their state_dict under our keys, layer by layer in order, for networks whose parametrised layers
    (convolutions, BatchNorms, linear layers) come in the same forward order under other names (our
    conv1_1/fc6 against torchvision's features.0/classifier.0). Each pair of layers must have the same
    entries; shapes are checked when loading."""
    ours, theirs = _layers(model.state_dict()), _layers(state_dict)
    name = type(model).__name__
    if len(ours) != len(theirs):
        raise ValueError(
            f"the state_dict has {len(theirs)} parametrised layers ({', '.join(theirs)}) but this {name} "
            f"has {len(ours)} ({', '.join(ours)}): the depths or the use of BatchNorm differ "
            f"(e.g. vgg16 vs vgg16_bn); build the lightcnn model of the same name")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (our_prefix, our_layer), (their_prefix, their_layer) in zip(ours.items(), theirs.items()):
        if set(our_layer) != set(their_layer):
            raise ValueError(
                f"their {their_prefix} ({_describe(their_layer)}: {sorted(their_layer)}) does not match our "
                f"{our_prefix} ({_describe(our_layer)}: {sorted(our_layer)}): the architectures differ "
                f"(with or without BatchNorm?)")
        for leaf, tensor in their_layer.items():
            out[f"{our_prefix}.{leaf}" if our_prefix else leaf] = tensor
    return out


def _layers(state_dict: StateDict) -> "OrderedDict[str, dict[str, torch.Tensor]]":
    """A state_dict's entries grouped by layer (the key up to its last dot), in order."""
    layers: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        layers.setdefault(prefix, {})[leaf] = value
    return layers


def _describe(layer: Mapping[str, torch.Tensor]) -> str:
    if "running_mean" in layer:
        return "BatchNorm"
    w = layer.get("weight")
    return {4: "Conv2d", 2: "Linear"}.get(w.dim() if w is not None else -1, "layer with " + "/".join(layer))


def _state_dict(source: nn.Module | StateDict) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        source = source.state_dict()
    elif not isinstance(source, Mapping):
        raise TypeError(f"expected an nn.Module or its state_dict, got {type(source).__name__}")
    # a `module.` prefix left by (Distributed)DataParallel
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in source.items()}


def load_twin(library: str, name: str, source: nn.Module | StateDict, load_classifier: bool = True,
              **overrides) -> nn.Module:
    """`create(name, **overrides)` in `library`'s layout, with the weights of `source` (a module of that
    library or its state_dict). The class count is the source classifier's unless `num_classes` is given;
    `load_classifier=False` keeps our freshly initialised classifier (fine-tuning to another class count)."""
    import lightcnn.models  # noqa: F401  (the family files register their twins on import)
    from lightcnn.models.registry import create

    twin = TWINS.get((library, name))
    if twin is None:
        raise ValueError(f"{name!r} has no {library} twin; models that do: {', '.join(twins(library))}")
    sd = _state_dict(source)
    if load_classifier and "num_classes" not in overrides:
        weights = [v for k, v in sd.items() if k.endswith("weight")]
        if weights:
            overrides["num_classes"] = weights[-1].shape[0]  # the classifier is the last layer
    kwargs = dict(twin.overrides, **overrides)
    with torch.device("meta"):  # the architecture alone: a file that does not fit fails before any weight is drawn
        skeleton = create(name, **kwargs)
    converted = _check_fit(library, name, twin, skeleton, sd, load_classifier)  # their tensors, our names
    model = create(name, **kwargs)
    model.load_state_dict(converted, strict=load_classifier)
    return model


def _check_fit(library: str, name: str, twin: Twin, model: nn.Module, sd: StateDict, load_classifier: bool
               ) -> dict[str, torch.Tensor]:
    """`sd` converted to `model`'s names by the twin; a ValueError naming what does not fit."""
    converted = dict(twin.convert(model, sd))
    ours = model.state_dict()
    if not load_classifier:
        head = twin.classifier + "."
        converted = {k: v for k, v in converted.items() if not k.startswith(head)}
        ours = {k: v for k, v in ours.items() if not k.startswith(head)}
    missing, unexpected = sorted(set(ours) - set(converted)), sorted(set(converted) - set(ours))
    if missing or unexpected:
        raise ValueError(f"the {library} state_dict does not fit {name}: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}; is it {library}'s {name}?")
    bad = [k for k, v in ours.items() if converted[k].shape != v.shape]
    if bad:
        head = twin.classifier + "."
        hint = (f" The classifier differs: build with num_classes={converted[bad[0]].shape[0]} or pass "
                "load_classifier=False." if all(k.startswith(head) for k in bad) else "")
        raise ValueError(f"shape mismatch for {len(bad)} tensors: " + ", ".join(
            f"{k}: theirs {tuple(converted[k].shape)} vs ours {tuple(ours[k].shape)}" for k in bad[:3]) + "." + hint)
    return converted


def from_torchvision(name: str, tv_model: nn.Module | StateDict, load_classifier: bool = True,
                     **overrides) -> nn.Module:
    """lightcnn's `name` with the weights of the torchvision model of the same architecture (see
    `twins("torchvision")`): `load_twin("torchvision", ...)`."""
    return load_twin("torchvision", name, tv_model, load_classifier, **overrides)


def from_timm(name: str, timm_model_or_state_dict: nn.Module | StateDict, load_classifier: bool = True,
              **overrides) -> nn.Module:
    """lightcnn's `name` with the weights of the timm model of the same architecture (see `twins("timm")`):
    `load_twin("timm", ...)`. The class count is timm's classifier's unless `num_classes` is given;
    `load_classifier=False` keeps a fresh classifier."""
    return load_twin("timm", name, timm_model_or_state_dict, load_classifier, **overrides)
