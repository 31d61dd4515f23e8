"""Import of torchvision's weights into the lightcnn networks whose layers equal torchvision's: VGG
(`vgg11` ... `vgg19_bn`) and `alexnet_owt` (torchvision's `alexnet`) here; `from_torchvision` also
serves ResNet (v1.5) and ResNeXt-50/101, whose mapping lives in `lightcnn.models.weights_resnet`.

    import torchvision
    from lightcnn.models.weights import from_torchvision
    tv = torchvision.models.vgg16(weights="IMAGENET1K_V1")   # or any torchvision VGG / AlexNet
    model = from_torchvision("vgg16", tv)                     # same outputs as tv in eval mode

Our layers carry the papers' names (conv1_1, fc6, ...) where torchvision numbers the layers of its
`nn.Sequential`s, so the state_dict is mapped layer by layer in order: both networks list their
parametrised layers (convolutions, BatchNorms, linear layers) in the same forward order, and each pair
must have the same kind of entries and the same shapes. The two-tower `alexnet` (groups=2, LRN),
`zfnet` and `googlenet` (torchvision's differs: BN and 3x3 "5x5" branches) have no torchvision twin.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from lightcnn.layers import LocalResponseNorm
from lightcnn.models.alexnet import AlexNet
from lightcnn.models.registry import create
from lightcnn.models.vgg import VGG

TORCHVISION_TWINS = ("alexnet_owt", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")


def _layers(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, dict[str, torch.Tensor]]":
    """Group a state_dict's entries by layer (the key up to its last dot), in the state_dict's order."""
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


def convert_torchvision_state_dict(model: nn.Module,
                                   tv_state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """torchvision's VGG/AlexNet state_dict, renamed to `model`'s keys (checked layer by layer)."""
    if not isinstance(model, (VGG, AlexNet)):
        raise TypeError(
            f"torchvision weights can be imported into VGG and alexnet_owt only, got a {type(model).__name__}; "
            f"models with a torchvision twin: {', '.join(TORCHVISION_TWINS)}"
        )
    if isinstance(model, AlexNet):
        towers = [m for m in model.features if isinstance(m, nn.Conv2d) and m.groups != 1]
        if towers or any(isinstance(m, LocalResponseNorm) for m in model.modules()):
            raise ValueError(
                "this AlexNet has grouped convolutions (two towers) or LRN, which torchvision's single-tower "
                "alexnet lacks: import torchvision's weights into create('alexnet_owt') instead"
            )
    if not isinstance(tv_state_dict, Mapping):
        raise TypeError(f"tv_state_dict must be a state_dict (a mapping of names to tensors), got "
                        f"{type(tv_state_dict).__name__}; pass tv_model.state_dict() or use from_torchvision")
    ours, theirs = _layers(model.state_dict()), _layers(tv_state_dict)
    name = type(model).__name__
    if len(ours) != len(theirs):
        raise ValueError(
            f"torchvision's state_dict has {len(theirs)} parametrised layers ({', '.join(theirs)}) but this {name} "
            f"has {len(ours)} ({', '.join(ours)}): the depths or the use of BatchNorm differ "
            f"(e.g. vgg16 vs vgg16_bn); build the lightcnn model of the same name as the torchvision one"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (our_prefix, our_layer), (tv_prefix, tv_layer) in zip(ours.items(), theirs.items()):
        if set(our_layer) != set(tv_layer):
            raise ValueError(
                f"torchvision's {tv_prefix} ({_describe(tv_layer)}: {sorted(tv_layer)}) does not match our "
                f"{our_prefix} ({_describe(our_layer)}: {sorted(our_layer)}): the architectures differ "
                f"(with or without BatchNorm?)"
            )
        for leaf, ours_t in our_layer.items():
            tv_t = tv_layer[leaf]
            if tuple(ours_t.shape) != tuple(tv_t.shape):
                classes_differ = our_prefix.endswith("fc8") and leaf == "weight" and ours_t.shape[1:] == tv_t.shape[1:]
                hint = f"; build ours with num_classes={tv_t.shape[0]}" if classes_differ else ""
                raise ValueError(
                    f"torchvision's {tv_prefix}.{leaf} has shape {tuple(tv_t.shape)} but our {our_prefix}.{leaf} has "
                    f"{tuple(ours_t.shape)}{hint}"
                )
            out[f"{our_prefix}.{leaf}" if our_prefix else leaf] = tv_t
    return out


def load_torchvision_state_dict(model: nn.Module, tv_state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load torchvision's VGG/AlexNet weights (`tv_model.state_dict()`) into `model`; returns `model`."""
    model.load_state_dict(convert_torchvision_state_dict(model, tv_state_dict), strict=True)
    return model


def from_torchvision(name: str, tv_model: nn.Module | Mapping[str, torch.Tensor], **overrides) -> nn.Module:
    """`create(name)` with the weights of a torchvision model (the module or its state_dict), for every
    model with a torchvision twin: VGG and `alexnet_owt` here, ResNet (v1.5 layout) and ResNeXt-50/101
    through `lightcnn.models.weights_resnet`. The class count is taken from the classifier unless
    `num_classes` is given."""
    from lightcnn.models import weights_resnet  # the ResNet family's own mapping

    if isinstance(tv_model, nn.Module):
        sd = tv_model.state_dict()
    elif isinstance(tv_model, Mapping):
        sd = tv_model
    else:
        raise TypeError(f"tv_model must be a torchvision nn.Module or its state_dict, got {type(tv_model).__name__}")
    if name in weights_resnet.TORCHVISION_EQUIVALENTS:
        return weights_resnet.resnet_from_torchvision(name, sd, **overrides)
    if name not in TORCHVISION_TWINS:
        twins = sorted(TORCHVISION_TWINS + tuple(weights_resnet.TORCHVISION_EQUIVALENTS))
        raise ValueError(f"{name!r} has no torchvision twin; models that do: {', '.join(twins)}")
    last_weight = [v for k, v in sd.items() if k.endswith("weight")][-1]
    overrides.setdefault("num_classes", last_weight.shape[0])
    return load_torchvision_state_dict(create(name, **overrides), sd)
