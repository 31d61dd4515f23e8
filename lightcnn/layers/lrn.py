"""nn.Module face of the LRN kernel."""
from __future__ import annotations

import torch
from torch import nn

from lightcnn.layers._impl import LAYER_OPS, Impl, resolve_impl, runs_kernel
from lightcnn.ops import _library, local_response_norm, lrn, reference


class LocalResponseNorm(nn.LocalResponseNorm):
    """Drop-in for `nn.LocalResponseNorm` (same arguments, same (empty) state_dict) on the LRN kernel.

    Args:
        size, alpha, beta, k: as `nn.LocalResponseNorm` (alpha is divided by size, as in PyTorch).
        impl: "auto", "kernel", "reference", or None to follow `lightcnn.layers.set_default_impl`.
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, impl: Impl | None = None):
        super().__init__(size, alpha, beta, k)
        self.impl = None if impl is None else resolve_impl(impl)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _library.is_fx_tracing():  # a Proxy has no device or dtype to choose by: trace PyTorch's LRN
            return super().forward(input)
        fn = local_response_norm if runs_kernel(self.impl, lrn.OP, input) else reference.local_response_norm
        return fn(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", impl={self.impl}" if self.impl else "")


LAYER_OPS["LocalResponseNorm"] = lrn.OP
