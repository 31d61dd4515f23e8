"""Pure-PyTorch references of every lightcnn op: the test oracle, and the fallback when lightcnn._C is
missing. Each has exactly the semantics of its compiled twin."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def local_response_norm(input: torch.Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> torch.Tensor:
    """`torch.nn.functional.local_response_norm`: b_c = a_c / (k + alpha/n * sum_{window} a^2)^beta with
    the window [c - n//2, c + (n-1)//2] and division by n also at the channel edges. In the input's dtype
    whatever autocast says (the kernel's autocast policy, lightcnn/ops/lrn.py)."""
    device_type = input.device.type
    # autocast exists for real devices only (not "meta"): nothing to turn off elsewhere
    with torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext():
        if input.device.type == "cpu" and input.dtype in (torch.float16, torch.bfloat16):
            # PyTorch's CPU pooling has no half-precision kernels for 4-D/5-D input: compute in float32.
            return F.local_response_norm(input.float(), size, alpha=alpha, beta=beta, k=k).to(input.dtype)
        return F.local_response_norm(input, size, alpha=alpha, beta=beta, k=k)


def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
                         var: torch.Tensor, n: int, momentum: float) -> None:
    """nn.BatchNorm2d's update of the running statistics from a batch's mean and biased variance over n
    values a channel (the running variance takes the unbiased one), in place: two fused multiply-adds a
    tensor, so that a GPU step spends four small launches on it, not ten."""
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum * n / (n - 1))


def dropout_mask(input: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask of dropout with drop probability p: bool, the input's shape and layout, True with
    probability 1 - p, drawn from torch's generator of the input's device. The fused op and this reference
    draw their masks here, so that the same seed gives both the same mask."""
    return torch.empty_like(input, dtype=torch.bool).bernoulli_(1.0 - p)


def dropout_with_mask(y: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout given its keep mask: y * mask / (1 - p) (the inverted dropout of `F.dropout`), as the two
    multiplications the fused kernel does, so that both round alike."""
    return y * mask * (1.0 / (1.0 - p))


def bn_relu_conv2d(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, conv_weight: torch.Tensor,
                   conv_bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1, groups: int = 1,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5, drop_rate: float = 0.0,
                   drop_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The unfused pre-activation unit `conv2d(dropout(relu(batch_norm(input))))`; like `F.batch_norm` it
    updates the running statistics in place in training. Dropout (drop_rate > 0, training only) uses
    `drop_mask` or a fresh `dropout_mask`. Autograd keeps the BN input, the ReLU output, the mask and the
    dropout output."""
    y = F.relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))
    if training and drop_rate > 0:
        y = dropout_with_mask(y, dropout_mask(input, drop_rate) if drop_mask is None else drop_mask, drop_rate)
    return F.conv2d(y, conv_weight, conv_bias, stride, padding, dilation, groups)


def dense_bn_relu_conv2d(features, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                         weight: torch.Tensor | None, bias: torch.Tensor | None, conv_weight: torch.Tensor,
                         padding=0, training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """The naive DenseNet layer `conv2d(relu(batch_norm(cat(features, 1))))` (stride 1, no conv bias); like
    `F.batch_norm` it updates the running statistics in place in training. Autograd keeps the new
    concatenation and the BN-ReLU output."""
    y = F.relu(F.batch_norm(torch.cat(list(features), 1), running_mean, running_var, weight, bias, training,
                            momentum, eps))
    return F.conv2d(y, conv_weight, None, 1, padding)
