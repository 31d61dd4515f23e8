"""Import of timm's weights into the lightcnn networks whose architecture equals timm's.

    import timm
    from lightcnn.models.weights_timm import from_timm
    t = timm.create_model("inception_v4", pretrained=True)    # or any timm model listed in TIMM_TWINS
    model = from_timm("inception_v4", t)                       # same outputs as t in eval mode

Nothing is downloaded here: pass a timm model or its state_dict. Our layers carry TF-slim's names
(Mixed_5b.Branch_1.Conv2d_0b_3x3.conv, ...) where timm numbers them, so each family registers how a
timm state_dict maps onto its keys (`register_timm_twin`). The default mapping pairs the two state
dicts layer by layer in order (both list their convolutions, BatchNorms and linear layers in forward
order) and checks that each pair has the same entries and shapes; a family whose order differs from
timm's registers its own `convert` function.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn

from lightcnn.models.registry import create
from lightcnn.models.weights import _describe, _layers

StateDict = Mapping[str, torch.Tensor]
Converter = Callable[[nn.Module, StateDict], Mapping[str, torch.Tensor]]


def convert_in_order(model: nn.Module, state_dict: StateDict) -> "OrderedDict[str, torch.Tensor]":
    """timm's state_dict renamed to `model`'s keys by pairing their parametrised layers in order; every pair
    must hold the same kind of entries with the same shapes."""
    ours, theirs = _layers(model.state_dict()), _layers(state_dict)
    name = type(model).__name__
    if len(ours) != len(theirs):
        raise ValueError(f"the timm state_dict has {len(theirs)} parametrised layers but this {name} has {len(ours)}: "
                         f"the architectures differ; build the lightcnn twin of the timm model (see TIMM_TWINS)")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (our_prefix, our_layer), (their_prefix, their_layer) in zip(ours.items(), theirs.items()):
        if set(our_layer) != set(their_layer):
            raise ValueError(f"timm's {their_prefix} ({_describe(their_layer)}: {sorted(their_layer)}) does not "
                             f"match our {our_prefix} ({_describe(our_layer)}: {sorted(our_layer)}): the architectures "
                             f"differ")
        for leaf, t in our_layer.items():
            theirs_t = their_layer[leaf]
            if tuple(t.shape) != tuple(theirs_t.shape):
                last = our_prefix == next(reversed(ours)) and leaf in ("weight", "bias")
                hint = f"; build ours with num_classes={theirs_t.shape[0]}" if last else ""
                raise ValueError(f"timm's {their_prefix}.{leaf} has shape {tuple(theirs_t.shape)} but our "
                                 f"{our_prefix}.{leaf} has {tuple(t.shape)}{hint}")
            out[f"{our_prefix}.{leaf}"] = theirs_t
    return out


class TimmTwin(NamedTuple):
    """A lightcnn model with timm's architecture: the timm model's name and how its state_dict maps onto ours."""

    timm_name: str
    convert: Converter = convert_in_order


# lightcnn name -> its timm twin; families add theirs with `register_timm_twin`.
TIMM_TWINS: dict[str, TimmTwin] = {}


def register_timm_twin(name: str, timm_name: str, convert: Converter = convert_in_order) -> None:
    """Declare that lightcnn model `name` has the architecture of timm's `timm_name`; `convert(model,
    timm_state_dict)` returns the state_dict to load into `model` (default: `convert_in_order`)."""
    if name in TIMM_TWINS:
        raise ValueError(f"{name!r} already has a timm twin ({TIMM_TWINS[name].timm_name})")
    TIMM_TWINS[name] = TimmTwin(timm_name, convert)


register_timm_twin("inception_v4", "inception_v4")
register_timm_twin("inception_resnet_v2", "inception_resnet_v2")


def load_timm_state_dict(model: nn.Module, name: str, state_dict: StateDict) -> nn.Module:
    """Load timm's weights (`timm_model.state_dict()`) into `model`, a lightcnn `name`; returns `model`."""
    if name not in TIMM_TWINS:
        raise ValueError(f"{name!r} has no timm twin; models that do: {', '.join(sorted(TIMM_TWINS))}")
    model.load_state_dict(TIMM_TWINS[name].convert(model, state_dict), strict=True)
    return model


def from_timm(name: str, timm_model_or_state_dict: nn.Module | StateDict, **overrides) -> nn.Module:
    """`create(name, **overrides)` with the weights of a timm model (the module or its state_dict). The class
    count is taken from timm's classifier unless `num_classes` is given."""
    if name not in TIMM_TWINS:
        raise ValueError(f"{name!r} has no timm twin; models that do: {', '.join(sorted(TIMM_TWINS))}")
    if isinstance(timm_model_or_state_dict, nn.Module):
        sd = timm_model_or_state_dict.state_dict()
    elif isinstance(timm_model_or_state_dict, Mapping):
        sd = timm_model_or_state_dict
    else:
        raise TypeError(f"pass a timm nn.Module or its state_dict, got {type(timm_model_or_state_dict).__name__}")
    weights = [v for k, v in sd.items() if k.endswith("weight")]
    if weights and weights[-1].dim() == 2:
        overrides.setdefault("num_classes", weights[-1].shape[0])
    return load_timm_state_dict(create(name, **overrides), name, sd)
