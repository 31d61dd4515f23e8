"""The one model registry: every network is created by name through `create`.

A builder is a function registered with `@register_model` (its name is the model's name) that takes
keyword overrides of the paper's numbers. A family that accepts any depth/width in its name (e.g.
`wrn{depth}_{k}`) registers a pattern with `register_model_pattern`.

Networks defined outside lightcnn are named in two more ways, so every tool (fit, test, predict, compare)
takes them: `"pkg.module:builder"` (any callable returning an `nn.Module`, called with `num_classes`,
`in_chans` when given and the overrides) and a package's entry point in the group `lightcnn.models`
(`[project.entry-points."lightcnn.models"] mynet = "mypkg.nets:mynet"`), looked up when a name is not
registered here.
"""
from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import importlib
import importlib.metadata
import inspect
import numbers
import re
import types
import typing
from typing import Any, Callable, Literal, Sequence, Union

from torch import nn

from lightcnn.layers import Impl

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PATTERNS: list[tuple[re.Pattern, Callable[..., nn.Module], str]] = []


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def register_model_pattern(pattern: str, example: str):
    """Register a builder for every name matching `pattern` (a regex whose groups are passed as ints)."""

    def deco(fn):
        _PATTERNS.append((re.compile(pattern + r"\Z"), fn, example))
        return fn

    return deco


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(fnmatch.filter(_MODELS, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS or any(p.match(name) for p, _, _ in _PATTERNS) or _entry_point(name) is not None

ENTRY_POINT_GROUP = "lightcnn.models"


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    """The installed entry point `name` of the group `lightcnn.models`, if a package declares one."""
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP).select(name=name)
    return next(iter(found), None)


def _import_builder(path: str) -> Callable[..., nn.Module]:
    """`pkg.module:attr` (attr may be dotted, e.g. `Class.build`) -> the object, or a ValueError saying why."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {path!r}: an external builder is written 'package.module:callable'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {path!r}: cannot import {module_name!r} ({e}); is its package installed "
                         f"or on PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {path!r}: {attr!r} is not callable")
    return obj


def _create_external(name: str, builder: Callable[..., nn.Module], overrides: dict) -> nn.Module:
    net = builder(**overrides)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model {name!r}: the builder returned {type(net).__name__}, not an nn.Module")
    return net


def create(name: str, num_classes: int | None = None, features_only: bool = False,
           out_indices: int | Sequence[int] | None = None, impl: Impl | None = None, **overrides) -> nn.Module:
    """Build a registered model. `num_classes` defaults to the class count of the paper's data set;
    `impl` picks the implementation of a model's kernel-backed layers ("auto", "kernel", "reference"; None:
    the model's default, which follows `lightcnn.layers.set_default_impl`); a model without such layers
    does not take it. Other keyword arguments override the builder's defaults (e.g. `drop_rate=0.3`).
    `name` may also be `"pkg.module:builder"` or an entry point of the group `lightcnn.models`.
    `features_only=True` returns the network's stage feature maps instead of logits (timm's, a
    `lightcnn.models.base.FeatureExtractor`), those of `out_indices` (stage indices; None: all).

    An unknown name is a ValueError listing the closest names. An override that the model does not take,
    or whose value does not fit the knob's annotation, is a TypeError naming the model, the knob and what
    it accepts (checked against the typed __init__ of the class the builder's return annotation names)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if impl is not None:
        if not _matches(impl, Impl):  # here for every builder, also those outside lightcnn
            raise TypeError(f"create({name!r}): impl={impl!r} does not fit impl: {_type_name(Impl)}.")
        overrides["impl"] = impl
    if features_only:
        from lightcnn.models.base import FeatureExtractor

        return FeatureExtractor(create(name, **overrides), out_indices)
    if out_indices is not None:
        raise ValueError(f"create({name!r}): out_indices selects feature maps; it needs features_only=True")
    if ":" in name:
        return _create_external(name, _import_builder(name), overrides)
    if name in _MODELS:
        _check_overrides(name, _MODELS[name], overrides)
        return _MODELS[name](**overrides)
    for pattern, fn, _ in _PATTERNS:
        m = pattern.match(name)
        if m:
            _check_overrides(name, fn, overrides)
            return fn(*(int(g) for g in m.groups()), **overrides)
    entry = _entry_point(name)
    if entry is not None:
        return _create_external(name, entry.load(), overrides)
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
    hint = f" Closest registered names: {', '.join(close)}." if close else ""
    patterns = "".join(f" Also accepted: names like {ex}." for _, _, ex in _PATTERNS)
    raise ValueError(
        f"Unknown model {name!r}.{hint}{patterns} See lightcnn.models.list_models() for all {len(_MODELS)} names; "
        f"a network of your own is named 'package.module:builder'."
    )


# --- checking the keyword overrides of `create` against the built class's typed __init__ ---------------


def _built_class(fn: Callable) -> type | None:
    """The class a builder returns, from its return annotation (None when it has none)."""
    ret = _hints(fn).get("return")
    return ret if isinstance(ret, type) and issubclass(ret, nn.Module) else None


def _type_name(hint: Any) -> str:
    """An annotation as a user reads it: `int`, `'a' | 'b' | None`, `Sequence[int]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if isinstance(hint, type) and origin is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint`. Checked: None, bool, int, float, str, Literal, unions and
    the container type of tuple/list/Sequence annotations; anything else is accepted (not guessed at)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        elem = args[0] if args and (origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)) else None
        return elem is None or all(_matches(v, elem) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy integers too; a bool is almost always a slip
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _keyword_params(fn: Callable) -> tuple[list[str], bool]:
    """The names `fn` takes by keyword, and whether it also takes **kwargs."""
    params = inspect.signature(fn).parameters
    names = [k for k, p in params.items() if k != "self" and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _hints(fn: Callable) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: nothing to check against
        return {}


def _check_overrides(name: str, fn: Callable, overrides: dict) -> None:
    """Raise a TypeError naming the model, the argument and what it accepts, for an override that neither
    the builder nor the class it builds takes (a misspelt knob), or a value of the wrong type."""
    cls = _built_class(fn)
    if cls is None:
        return
    own, _ = _keyword_params(fn)  # arguments a builder consumes itself
    accepted, open_ended = _keyword_params(cls.__init__)
    if open_ended:
        return
    for key in overrides:
        renamed = getattr(cls, "renamed_args", {}).get(key)
        if renamed is not None and key not in accepted and key not in own:
            raise TypeError(f"create({name!r}): {cls.__name__}'s {key!r} is now {renamed}.")
        if key not in accepted and key not in own:
            close = difflib.get_close_matches(key, accepted + own, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise TypeError(
                f"create({name!r}): unknown argument {key!r} for {cls.__name__}.{hint} "
                f"{cls.__name__} accepts: {', '.join(accepted)}."
            )
    fn_hints, cls_hints = _hints(fn), _hints(cls.__init__)
    for key, value in overrides.items():
        hint = fn_hints.get(key) if key in own else cls_hints.get(key)
        if hint is not None and not _matches(value, hint):
            raise TypeError(
                f"create({name!r}): {key}={value!r} does not fit {cls.__name__}'s {key}: "
                f"{_type_name(hint)} (got {type(value).__name__})."
            )
