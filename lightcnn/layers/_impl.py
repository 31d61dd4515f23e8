"""Which implementation the kernel-backed layers use:

  "auto"       (the default) per call, the kernel where it was measured no slower than the reference, the
               reference elsewhere: the op's choice table in lightcnn.ops (by device type, dtype, layout and
               TF32; `lightcnn.ops.backend_info()["ops"][op]["auto"]` prints it, README "Kernels" explains it)
  "kernel"     always lightcnn._C (an error where none is compiled for the input's device type)
  "reference"  the pure PyTorch ops

A layer built with `impl=None` follows the process-wide default at every call, so a whole network can be
switched with `set_default_impl("reference")` or `with default_impl("reference"): ...`.
"""
from __future__ import annotations

import contextlib
from typing import Literal, get_args

import torch

from lightcnn.ops import _library

# The type of every `impl` argument (layers, models, `lightcnn.models.create`, the CLI's `--model.impl`), so
# that jsonargparse and the registry reject any other value with the list of these.
Impl = Literal["auto", "kernel", "reference"]
IMPLS: tuple[str, ...] = get_args(Impl)
_default: Impl = "auto"


def check_impl(impl: str) -> Impl:
    """`impl` itself, or a ValueError naming the accepted values."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    return impl


def set_default_impl(impl: Impl) -> None:
    global _default
    _default = check_impl(impl)


def get_default_impl() -> Impl:
    return _default


@contextlib.contextmanager
def default_impl(impl: Impl):
    global _default
    old, _default = _default, check_impl(impl)
    try:
        yield
    finally:
        _default = old


def resolve_impl(impl: Impl | None) -> Impl:
    return _default if impl is None else check_impl(impl)


def runs_kernel(impl: Impl | None, op: _library.KernelOp, x: torch.Tensor) -> bool:
    """Whether a layer with this `impl` runs `op`'s kernel path on input `x` ("auto" asks the op's table;
    "kernel" raises where no kernel is compiled for x's device type; "auto" falls back with a warning)."""
    impl = resolve_impl(impl)
    if _library.is_fx_tracing():
        return False
    if impl == "auto":
        return _library.auto_uses_kernel(op, _library.config_of(x, op.autocast))
    if impl == "kernel":
        if x.device.type != "meta":  # meta tensors run the op's fake kernel: no compiled kernel needed
            _library.require_kernel(op, x.device.type)
        return True
    return False


# Layer type -> the op it runs (each layer module adds itself), for backend_info().
LAYER_OPS: dict[str, _library.KernelOp] = {}


def backend_info() -> dict:
    """Which implementation each kernel-backed layer type uses: {'default_impl': 'auto'|'kernel'|'reference',
    'layers': {layer: {'op': name, 'compiled': {device type: bool}, 'auto': {configuration: 'kernel' |
    'reference'}, 'auto_reason': why the table is so}}}. Under "auto" a configuration marked "kernel" runs
    the kernel where it is compiled (elsewhere the reference, with one warning); "kernel" forces it;
    "reference" never uses it."""
    return {
        "default_impl": _default,
        "layers": {name: {"op": op.name, "compiled": dict(op.compiled), "auto": _library.auto_table(op),
                          "auto_reason": op.auto_reason}
                   for name, op in LAYER_OPS.items()},
    }
