"""The dense_bn_relu_conv2d op's sample inputs: one table that every test of the op draws from, as PyTorch's
OpInfo `sample_inputs` do. tests/test_dense.py (the CPU kernel against the naive concatenation, gradcheck,
opcheck), tests/test_cuda_emulated.py (the CUDA code path on the emulator) and benchmarks/sanitize_ops.py
(compute-sanitizer on a GPU) take their cases from `SAMPLES`.

A sample is the op's configuration (the features' channel counts, N, H, W, odd ones included; the conv's
kernel size, with the padding that keeps H and W; BN with or without affine parameters; training or eval;
the op has no stride, groups, dilation or conv bias); `make(dtype, kind, device)` draws its tensors in that
dtype (half features get float32 BN parameters, as under AMP) and memory layout: every feature contiguous,
channels-last, or "mixed" (channels-last, strided and contiguous in turn).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from tests.samples_bn_relu_conv import DTYPES, HALF, layout

__all__ = ["DTYPES", "HALF", "KINDS", "SAMPLES", "GRADCHECK", "OPCHECK", "CUDA_ONLY", "Args", "Sample"]

KINDS = ("contiguous", "channels_last", "mixed")
_MIXED = ("channels_last", "strided", "contiguous")


@dataclass
class Args:
    """The op's arguments, in the order of torch.ops.lightcnn.dense_bn_relu_conv2d."""
    features: list[torch.Tensor]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    conv_weight: torch.Tensor
    padding: list[int]
    training: bool
    eps: float

    def op(self) -> list:
        """The positional arguments of torch.ops.lightcnn.dense_bn_relu_conv2d."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def backward(self, grad_output, mean, var) -> list:
        """The positional arguments of torch.ops.lightcnn.dense_bn_relu_conv2d_backward, given the forward's
        (mean, var)."""
        return [grad_output, self.features, self.weight, self.bias, mean, var, self.conv_weight, self.padding,
                self.training, self.eps]

    def functional(self) -> dict:
        """The keyword arguments of lightcnn.ops.dense_bn_relu_conv2d and its reference."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def double(self) -> Args:
        """A copy with every floating-point tensor in float64 (the reference computation of a half sample)."""
        def d(v):
            return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        return dataclasses.replace(self, features=[d(f) for f in self.features],
                                   **{f.name: d(getattr(self, f.name)) for f in dataclasses.fields(self)[1:]})


@dataclass(frozen=True)
class Sample:
    name: str
    channels: tuple[int, ...] = (4, 2, 3)
    shape: tuple[int, int, int] = (2, 5, 4)  # N, H, W
    out_channels: int = 3
    kernel_size: int = 1
    affine: bool = True
    training: bool = True

    def make(self, dtype=torch.float64, kind="contiguous", device="cpu") -> Args:
        """The sample's tensors (drawn in float64 from torch's seeded generator, then cast)."""
        N, H, W = self.shape
        kinds = [_MIXED[i % 3] for i in range(len(self.channels))] if kind == "mixed" else [kind] * len(self.channels)
        pdt = torch.float32 if dtype in HALF else dtype  # half features with float32 BN parameters (AMP)
        feats = [layout(torch.randn(N, c, H, W, dtype=torch.float64).to(device, dtype), k)
                 for c, k in zip(self.channels, kinds)]
        C, k = sum(self.channels), self.kernel_size

        def param(t):
            return t.to(device, pdt)

        positive = [param(torch.rand(C, dtype=torch.float64) + 0.5) for _ in range(2)]
        w, b = (positive[0], param(torch.randn(C, dtype=torch.float64))) if self.affine else (None, None)
        conv_weight = torch.randn(self.out_channels, C, k, k, dtype=torch.float64).to(device, dtype)
        return Args(feats, w, b, param(torch.randn(C, dtype=torch.float64)), positive[1], conv_weight, [k // 2] * 2,
                    self.training, 1e-5)

    def __str__(self) -> str:
        return self.name


SAMPLES = {s.name: s for s in [
    Sample("three_features"),
    Sample("3x3_eval", kernel_size=3, training=False),
    Sample("one_feature", channels=(5,)),
    Sample("split_reduction", channels=(2, 1, 3), shape=(2, 64, 64)),  # N*H*W = 8192: two CUDA blocks per channel
    Sample("70_features", channels=(1,) * 35 + (2,) * 35, shape=(2, 2, 3)),  # two CUDA launches of at most 64
    Sample("many_images", channels=(3, 2), shape=(16, 5, 4)),  # a CUDA thread's values span several images
    Sample("no_affine_3x3", channels=(3, 1), shape=(3, 3, 5), kernel_size=3, affine=False),
    Sample("one_pixel_eval", channels=(2, 3), shape=(1, 1, 1), training=False),
    # small: gradcheck's and opcheck's
    Sample("small", channels=(2, 1, 2), shape=(2, 3, 3), kernel_size=3),
    Sample("small_eval", channels=(2, 1, 2), shape=(2, 3, 3), kernel_size=3, training=False),
]}
# samples for the CUDA kernels' launch structure only (several blocks per channel, launches of at most 64
# features): the CPU tests skip them
CUDA_ONLY = ("split_reduction", "70_features")
# (sample, layout) pairs gradcheck (float64) and opcheck (float32) run
GRADCHECK = (("small", "contiguous"), ("small_eval", "contiguous"))
OPCHECK = tuple((name, kind) for name in ("small", "small_eval") for kind in ("contiguous", "channels_last"))
