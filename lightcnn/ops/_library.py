"""Loading of the compiled library lightcnn._C and the choice between kernel and reference per call.

Importing lightcnn._C runs its TORCH_LIBRARY registrations (torch.ops.lightcnn.*). When it is missing
or was built against another torch (undefined symbols), every op falls back to its PyTorch reference
with one warning; LIGHTCNN_REQUIRE_KERNELS=1 turns that into an error (CI sets it).
"""
from __future__ import annotations

import os
import warnings

import torch

# Every op of the library: name in torch.ops.lightcnn -> the public function that uses it.
KNOWN_OPS: list[str] = []

_load_error: str | None = None
_library_path: str | None = None
_warned: set[str] = set()


def _load() -> None:
    global _load_error, _library_path
    try:
        from lightcnn import _C  # noqa: F401  (torch is imported first, as the extension needs)

        _library_path = _C.__file__
    except ImportError as e:  # not built, or built against a different torch
        hint = (
            "build it with `pip install --no-build-isolation -e .` in the environment that runs it"
            if "undefined symbol" not in str(e)
            else "it was compiled against a different torch than this one "
            f"({torch.__version__}); rebuild with `pip install --no-build-isolation -e .`"
        )
        _load_error = f"lightcnn._C could not be loaded ({e}); {hint}"


_load()


def require_kernels() -> bool:
    return os.environ.get("LIGHTCNN_REQUIRE_KERNELS", "0") == "1"


def library_loaded() -> bool:
    return _load_error is None


def op_defined(op: str) -> bool:
    """Whether the loaded library defines torch.ops.lightcnn.<op> (False for a stale build)."""
    if _load_error is not None:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(f"lightcnn::{op}", "")
        return True
    except RuntimeError:
        return False


@torch.compiler.assume_constant_result  # fixed for the life of the process: torch.compile folds it
def has_kernel(op: str, device_type: str) -> bool:
    """Whether torch.ops.lightcnn.<op> has a compiled kernel for this device type ('cpu', 'cuda')."""
    if not op_defined(op):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"lightcnn::{op}", key)


def use_kernel(op: str, device: torch.device) -> bool:
    """True when the compiled op serves tensors on `device`; otherwise warn once (or raise) and say so."""
    if has_kernel(op, device.type):
        return True
    if _load_error is not None:
        why = _load_error
    elif not op_defined(op):
        why = f"lightcnn._C ({_library_path}) defines no op {op}: it is a stale build; rebuild with `pip install --no-build-isolation -e .`"
    else:
        why = f"lightcnn._C has no {device.type.upper()} kernel for {op}" + (
            " (it was built without CUDA: rebuild on a machine with nvcc, or set LIGHTCNN_FORCE_CUDA=1)"
            if device.type == "cuda" else ""
        )
    if require_kernels():
        raise RuntimeError(f"{why}. LIGHTCNN_REQUIRE_KERNELS=1 forbids falling back to the PyTorch reference.")
    if (op, device.type) not in _warned:
        _warned.add((op, device.type))
        warnings.warn(f"{why}; falling back to the PyTorch reference for {op} (slower, more memory).", stacklevel=3)
    return False


def backend_info() -> dict:
    """Which op runs compiled on which device: {'library': path|None, 'error': str|None, 'cuda_compiled':
    bool, 'ops': {op: {'cpu': bool, 'cuda': bool}}}."""
    ops = {op: {"cpu": has_kernel(op, "cpu"), "cuda": has_kernel(op, "cuda")} for op in KNOWN_OPS}
    return {
        "library": _library_path,
        "error": _load_error,
        "torch": torch.__version__,
        "cuda_compiled": any(v["cuda"] for v in ops.values()),
        "ops": ops,
    }
