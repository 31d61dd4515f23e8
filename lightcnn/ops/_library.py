"""The one place that knows lightcnn's compiled ops: loading lightcnn._C, the op list, the dtypes each
op's kernels take per device type, which device types have a compiled kernel (looked up once), and the
"auto" choice between kernel and reference per configuration.

Importing lightcnn._C runs its TORCH_LIBRARY registrations (torch.ops.lightcnn.*). When it is missing
or was built against another torch (undefined symbols), every op falls back to its PyTorch reference
with one warning; LIGHTCNN_REQUIRE_KERNELS=1 turns that into an error (CI sets it).

Adding an op (its files, this module's one registration line and how its function asks for the kernel):
CONTRIBUTING.md, "A kernel".
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DEVICE_TYPES = ("cpu", "cuda")

_load_error: str | None = None
_library_path: str | None = None
_warned: set[tuple[str, str]] = set()


def _load() -> None:
    global _load_error, _library_path
    try:
        from lightcnn import _C  # torch is imported first, as the extension needs

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


def is_fx_tracing() -> bool:
    """Whether torch.fx is tracing symbolically (torchvision's create_feature_extractor): its Proxies have no
    device, dtype or layout to choose a kernel by, so layers trace their PyTorch reference."""
    from torch.fx import _symbolic_trace

    return getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)()


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


def _dispatcher_has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return op_defined(op) and torch._C._dispatch_has_kernel_for_dispatch_key(f"lightcnn::{op}", key)


@dataclass(frozen=True)
class Config:
    """What the "auto" choice looks at: device type, the input's dtype, the autocast dtype that the op's
    convolution would run in (None without autocast, or for ops autocast does not touch), layout, and
    cuDNN's TF32 switch (only when a float32 convolution runs on CUDA)."""

    device_type: str
    dtype: torch.dtype
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    tf32: bool = False

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.dtype

    def __str__(self) -> str:
        def name(d):
            return str(d).removeprefix("torch.")
        text = f"{self.device_type} {name(self.dtype)}"
        if self.autocast_dtype is not None:
            text += f" autocast {name(self.autocast_dtype)}"
        elif self.device_type == "cuda" and self.dtype == torch.float32:
            text += " TF32 on" if self.tf32 else " TF32 off"
        return text + (" channels-last" if self.channels_last else " NCHW")


@dataclass
class KernelOp:
    """A compiled op: its name in torch.ops.lightcnn, the other ops it uses (its backward), the input
    dtypes its kernels take per device type (others run on the reference, silently), and `auto`: the
    configurations where the kernel is the default (True) or the reference is (False)."""

    name: str
    dtypes: dict[str, tuple[torch.dtype, ...]]
    helpers: tuple[str, ...] = ()
    auto: Callable[[Config], bool] = lambda cfg: True
    auto_reason: str = ""
    autocast: bool = False  # autocast casts the op's convolution (see config_of)
    compiled: dict[str, bool] = field(default_factory=dict)  # per device type, filled once by register()

    @property
    def defined(self) -> bool:
        """The loaded library defines the op and its helpers (register fake/autograd only then)."""
        return all(op_defined(n) for n in (self.name, *self.helpers))


OPS: dict[str, KernelOp] = {}


def register(name: str, *, dtypes: dict[str, tuple[torch.dtype, ...]], helpers: tuple[str, ...] = (),
             auto: Callable[[Config], bool] | None = None, auto_reason: str = "", autocast: bool = False) -> KernelOp:
    """Declare torch.ops.lightcnn.<name>: looks its kernels up once and adds it to `OPS` and backend_info().
    `auto(cfg)`: whether impl="auto" picks the kernel (default: always); `autocast`: the op contains a
    convolution that autocast casts, so "auto" looks at the autocast dtype."""
    op = KernelOp(name, dtypes, tuple(helpers), auto or (lambda cfg: True), auto_reason, autocast)
    op.compiled = {dt: all(_dispatcher_has_kernel(n, dt) for n in (name, *helpers)) for dt in DEVICE_TYPES}
    OPS[name] = op
    return op


def _get(op: KernelOp | str) -> KernelOp:
    return op if isinstance(op, KernelOp) else OPS[op]


def has_kernel(op: KernelOp | str, device_type: str) -> bool:
    """Whether torch.ops.lightcnn.<op> has a compiled kernel for this device type ('cpu', 'cuda')."""
    return _get(op).compiled.get(device_type, False)


def _missing_reason(op: KernelOp, device_type: str) -> str:
    if _load_error is not None:
        why = _load_error
    elif not op.defined:
        why = (f"lightcnn._C ({_library_path}) defines no op {op.name}: it is a stale build; rebuild with "
               "`pip install --no-build-isolation -e .`")
    else:
        why = f"lightcnn._C has no {device_type.upper()} kernel for {op.name}" + (
            " (it was built without CUDA: rebuild on a machine with nvcc, or set LIGHTCNN_FORCE_CUDA=1)"
            if device_type == "cuda" else "")
    return why


class KernelUnavailableError(RuntimeError):
    """impl="kernel" asked for a compiled kernel that this build does not have."""


def require_kernel(op: KernelOp | str, device_type: str) -> None:
    """impl="kernel" forces the compiled op: raise (never fall back) when this device type has none."""
    op = _get(op)
    if not op.compiled.get(device_type, False):
        raise KernelUnavailableError(f'impl="kernel": {_missing_reason(op, device_type)}. Use impl="auto" or '
                                     '"reference" to run on the PyTorch reference instead.')


def _fallback(op: KernelOp, device_type: str) -> bool:
    """Say (once) why the kernel cannot serve this device, or raise under LIGHTCNN_REQUIRE_KERNELS=1."""
    why = _missing_reason(op, device_type)
    if require_kernels():
        raise RuntimeError(f"{why}. LIGHTCNN_REQUIRE_KERNELS=1 forbids falling back to the PyTorch reference.")
    if (op.name, device_type) not in _warned:
        _warned.add((op.name, device_type))
        warnings.warn(f"{why}; falling back to the PyTorch reference for {op.name} (slower, more memory).",
                      stacklevel=3)
    return False


def use_kernel(op: KernelOp | str, input: torch.Tensor) -> bool:
    """True when the compiled op serves `input` (its device type has a kernel taking its dtype). Dtypes the
    kernels do not take run on the reference silently; a missing kernel warns once (or raises)."""
    op = _get(op)
    device_type = input.device.type
    if input.dtype not in op.dtypes.get(device_type, ()):
        return False
    return op.compiled.get(device_type, False) or _fallback(op, device_type)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels compute in and return; mirrors kernel_memory_format() in csrc/common.h."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def config_of(x: torch.Tensor, autocast: bool = False) -> Config:
    """The Config of an op's input; `autocast`: the op has a convolution that autocast would cast (then a
    float32 input under autocast on its device gives the autocast dtype)."""
    device_type, dtype = x.device.type, x.dtype
    autocast_dtype = None
    # (autocast knows real devices only: a "meta" tensor has no autocast state to ask about)
    if autocast and dtype == torch.float32 and device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        autocast_dtype = torch.get_autocast_dtype(device_type)
    channels_last = memory_format(x) != torch.contiguous_format
    tf32 = (device_type == "cuda" and dtype == torch.float32 and autocast_dtype is None
            and torch.backends.cudnn.allow_tf32)
    return Config(device_type, dtype, autocast_dtype, channels_last, tf32)


def auto_uses_kernel(op: KernelOp | str, cfg: Config) -> bool:
    """Whether impl="auto" runs the kernel in this configuration (before asking if one is compiled)."""
    op = _get(op)
    return cfg.dtype in op.dtypes.get(cfg.device_type, ()) and op.auto(cfg)


def auto_table(op: KernelOp | str, autocast_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)) -> dict[str, str]:
    """impl="auto"'s choice ("kernel" or "reference") for the op's kernel dtypes, both layouts, TF32 on and
    off (CUDA float32), and, for ops autocast casts, float32 inputs under autocast to `autocast_dtypes`."""
    op = _get(op)
    table = {}
    for device_type, dtypes in op.dtypes.items():
        for dtype in dtypes:
            variants = [dict()]
            if device_type == "cuda" and dtype == torch.float32:
                variants += [dict(tf32=True)]
            if op.autocast and dtype == torch.float32:
                variants += [dict(autocast_dtype=a) for a in autocast_dtypes]
            for channels_last in (False, True):
                for extra in variants:
                    cfg = Config(device_type, dtype, channels_last=channels_last, **extra)
                    table[str(cfg)] = "kernel" if op.auto(cfg) else "reference"
    return table


def backend_info() -> dict:
    """What runs where: {'library': path|None, 'error': str|None, 'torch': version, 'cuda_compiled': bool,
    'ops': {op: {'cpu': bool, 'cuda': bool, 'dtypes': {...}, 'auto': {config: 'kernel'|'reference'},
    'auto_reason': str}}}. `auto` is what layers built with impl="auto" (the default) use when the
    kernel is compiled for that device; `cpu`/`cuda` say whether it is."""
    ops = {
        name: {
            "cpu": op.compiled.get("cpu", False),
            "cuda": op.compiled.get("cuda", False),
            "dtypes": {dt: [str(d).removeprefix("torch.") for d in ds] for dt, ds in op.dtypes.items()},
            "auto": auto_table(op),
            "auto_reason": op.auto_reason,
        }
        for name, op in OPS.items()
    }
    return {
        "library": _library_path,
        "error": _load_error,
        "torch": torch.__version__,
        "cuda_compiled": any(v["cuda"] for v in ops.values()),
        "ops": ops,
    }
