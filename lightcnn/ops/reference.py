"""Pure-PyTorch references of every lightcnn op: the test oracle, and the fallback when lightcnn._C is
missing. Each has exactly the semantics of its compiled twin."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """`torch.nn.functional.local_response_norm`: b_c = a_c / (k + alpha/n * sum_{window} a^2)^beta with
    the window [c - n//2, c + (n-1)//2] and division by n also at the channel edges."""
    return F.local_response_norm(input, size, alpha=alpha, beta=beta, k=k)
