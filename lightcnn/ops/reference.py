"""Pure-PyTorch references of every lightcnn op: the test oracle, and the fallback when lightcnn._C is
missing. Each has exactly the semantics of its compiled twin."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """`torch.nn.functional.local_response_norm`: b_c = a_c / (k + alpha/n * sum_{window} a^2)^beta with
    the window [c - n//2, c + (n-1)//2] and division by n also at the channel edges."""
    if input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
        # PyTorch's CPU pooling has no half-precision kernels for 4-D/5-D input: compute in float32.
        return F.local_response_norm(input.float(), size, alpha=alpha, beta=beta, k=k).to(input.dtype)
    return F.local_response_norm(input, size, alpha=alpha, beta=beta, k=k)
