"""nn.Module faces of lightcnn's kernels, each with `impl="auto" | "kernel" | "reference"` (see _impl.py)."""
from lightcnn.layers._impl import (
    IMPLS,
    Impl,
    backend_info,
    check_impl,
    default_impl,
    get_default_impl,
    resolve_impl,
    set_default_impl,
)
from lightcnn.layers.bn_relu_conv import BNReLUConv2d
from lightcnn.layers.dense import DenseConv2d
from lightcnn.layers.lrn import LocalResponseNorm

__all__ = ["IMPLS", "BNReLUConv2d", "DenseConv2d", "Impl", "LocalResponseNorm", "backend_info", "check_impl",
           "default_impl", "get_default_impl", "resolve_impl", "set_default_impl"]
