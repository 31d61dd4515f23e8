"""Which implementation the kernel-backed layers use: "kernel" (lightcnn._C, falling back to the
reference with a warning where no kernel is compiled) or "reference" (pure PyTorch ops).

A layer built with `impl=None` follows the process-wide default at every call, so a whole network can be
switched with `set_default_impl("reference")` or `with default_impl("reference"): ...`.
"""
from __future__ import annotations

import contextlib

IMPLS = ("kernel", "reference")
_default = "kernel"


def _check(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def set_default_impl(impl: str) -> None:
    global _default
    _default = _check(impl)


def get_default_impl() -> str:
    return _default


@contextlib.contextmanager
def default_impl(impl: str):
    global _default
    old, _default = _default, _check(impl)
    try:
        yield
    finally:
        _default = old


def resolve_impl(impl: str | None) -> str:
    return _default if impl is None else _check(impl)
