"""The one model registry: every network is created by name through `create`.

A builder is a function registered with `@register_model` (its name is the model's name) that takes
keyword overrides of the paper's numbers. A family that accepts any depth/width in its name (e.g.
`wrn{depth}_{k}`) registers a pattern with `register_model_pattern`.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Callable

from torch import nn

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
    return name in _MODELS or any(p.match(name) for p, _, _ in _PATTERNS)


def create(name: str, num_classes: int | None = None, **overrides) -> nn.Module:
    """Build a registered model. `num_classes` defaults to the class count of the paper's data set;
    other keyword arguments override the builder's defaults (e.g. `drop_rate=0.3`, `impl="reference"`)."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if name in _MODELS:
        return _MODELS[name](**overrides)
    for pattern, fn, _ in _PATTERNS:
        m = pattern.match(name)
        if m:
            return fn(*(int(g) for g in m.groups()), **overrides)
    close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
    hint = f" Closest registered names: {', '.join(close)}." if close else ""
    patterns = "".join(f" Also accepted: names like {ex}." for _, _, ex in _PATTERNS)
    raise ValueError(
        f"Unknown model {name!r}.{hint}{patterns} See lightcnn.models.list_models() for all {len(_MODELS)} names."
    )
