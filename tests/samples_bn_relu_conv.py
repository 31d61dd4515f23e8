"""The bn_relu_conv2d op's sample inputs: one table that every test of the op draws from, as PyTorch's OpInfo
`sample_inputs` do. tests/test_bn_relu_conv.py (the CPU kernel against the unfused reference, gradcheck,
opcheck), tests/test_cuda_emulated.py (the CUDA code path on the emulator) and benchmarks/sanitize_ops.py
(compute-sanitizer on a GPU) take their cases from `SAMPLES`.

A sample is the op's configuration (shapes, odd ones included; stride, padding, dilation, groups; BN with or
without affine parameters; conv bias or none; training or eval; dropout); `make(dtype, layout, device)`
draws its tensors in that dtype (half inputs get float32 BN parameters, as under AMP) and memory layout
(contiguous, channels-last, or a strided view in neither layout).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # the CUDA kernels' (CPU: the first two)
HALF = (torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "strided")

# Conv geometries of the fused layer's tests: (kernel_size, stride, padding, dilation, groups)
CONFIGS = {
    "k1": (1, 1, 0, 1, 1),
    "k3": (3, 1, 1, 1, 1),
    "k1_stride2": (1, 2, 0, 1, 1),
    "k3_stride2": (3, 2, 1, 1, 1),
    "k3_pad2_dilation2": (3, 1, 2, 2, 1),
    "k3_groups2": (3, 1, 1, 1, 2),
    "k3_depthwise": (3, 1, 1, 1, 4),
}


def layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    """x in the memory layout `kind` (one of LAYOUTS): "strided" is every other column of a wider tensor."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind != "contiguous":
        raise ValueError(f"unknown layout {kind!r}; one of {LAYOUTS}")
    return x.contiguous()


@dataclass
class Args:
    """The op's arguments, in the order of torch.ops.lightcnn.bn_relu_conv2d."""
    input: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    training: bool
    eps: float
    drop_mask: torch.Tensor | None
    drop_rate: float

    def op(self) -> list:
        """The positional arguments of torch.ops.lightcnn.bn_relu_conv2d."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def backward(self, grad_output, mean, var) -> list:
        """The positional arguments of torch.ops.lightcnn.bn_relu_conv2d_backward, given the forward's
        (mean, var)."""
        return [grad_output, self.input, self.weight, self.bias, mean, var, self.conv_weight, self.stride,
                self.padding, self.dilation, self.groups, self.training, self.eps, self.conv_bias is not None,
                self.drop_mask, self.drop_rate]

    def functional(self) -> dict:
        """The keyword arguments of lightcnn.ops.bn_relu_conv2d and its reference."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def double(self) -> Args:
        """A copy with every floating-point tensor in float64 (the reference computation of a half sample)."""
        return dataclasses.replace(self, **{
            f.name: v.double() for f in dataclasses.fields(self)
            if isinstance(v := getattr(self, f.name), torch.Tensor) and v.is_floating_point()})


@dataclass(frozen=True)
class Sample:
    name: str
    shape: tuple[int, int, int, int] = (2, 6, 5, 4)
    out_channels: int = 4
    kernel_size: int = 3
    stride: tuple[int, int] = (1, 1)
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    affine: bool = True
    conv_bias: bool = True
    training: bool = True
    drop_rate: float = 0.0

    def make(self, dtype=torch.float64, kind="contiguous", device="cpu") -> Args:
        """The sample's tensors (drawn in float64 from torch's seeded generator, then cast)."""
        N, C, H, W = self.shape
        pdt = torch.float32 if dtype in HALF else dtype  # half activations with float32 BN parameters (AMP)

        x = layout(_randn(*self.shape).to(device, dtype), kind)
        w, b = (_positive(C).to(device, pdt), _randn(C).to(device, pdt)) if self.affine else (None, None)
        k = self.kernel_size
        conv_weight = _randn(self.out_channels, C // self.groups, k, k).to(device, dtype)
        conv_bias = _randn(self.out_channels).to(device, dtype) if self.conv_bias else None
        mask = (torch.rand(self.shape) >= self.drop_rate).to(device) if self.drop_rate else None
        return Args(x, w, b, _randn(C).to(device, pdt), _positive(C).to(device, pdt), conv_weight, conv_bias,
                    list(self.stride), [self.padding] * 2, [self.dilation] * 2, self.groups, self.training, 1e-5,
                    mask, self.drop_rate)

    def __str__(self) -> str:
        return self.name


def _randn(*size) -> torch.Tensor:
    return torch.randn(size, dtype=torch.float64)


def _positive(*size) -> torch.Tensor:  # BN scales and variances
    return torch.rand(size, dtype=torch.float64) + 0.5


SAMPLES = {s.name: s for s in [
    Sample("base"),
    Sample("eval", training=False),
    Sample("groups2_stride2x1", groups=2, stride=(2, 1)),
    Sample("dropout", drop_rate=0.3),
    Sample("one_row", shape=(3, 37, 1, 3)),
    Sample("split_reduction", shape=(2, 3, 64, 64)),  # several blocks per channel in the CUDA reductions
    # 16-byte vectors in the CUDA elementwise passes: channels-last (C % 8 == 0), NCHW (H*W % 8 == 0), with
    # the dropout too, and a dropout with the scalar tail only
    Sample("vector16", shape=(2, 16, 3, 5)),
    Sample("dropout_scalar_tail", shape=(2, 5, 4, 4), drop_rate=0.3),
    Sample("dropout_vector16", shape=(2, 16, 4, 4), drop_rate=0.3),
    Sample("no_affine", affine=False),  # BN without weight and bias
    Sample("no_affine_eval", affine=False, training=False),
    Sample("dilation2", shape=(2, 4, 7, 6), padding=2, dilation=2, conv_bias=False),
    Sample("depthwise", shape=(2, 4, 5, 4), groups=4, out_channels=8),
    Sample("k1_stride2_eval", shape=(3, 5, 6, 7), kernel_size=1, padding=0, stride=(2, 2), training=False,
            conv_bias=False),
    # small: gradcheck's and opcheck's (a stride per axis)
    Sample("small", shape=(2, 3, 5, 4), stride=(2, 1)),
    Sample("small_eval", shape=(2, 3, 5, 4), stride=(2, 1), training=False),
    Sample("small_dropout", shape=(2, 3, 5, 4), stride=(2, 1), drop_rate=0.4),
]}
# samples for the CUDA kernels' launch structure only (several blocks per channel): the CPU tests skip them
CUDA_ONLY = ("split_reduction",)
# (sample, layout) pairs gradcheck (float64) and opcheck (float32) run
GRADCHECK = (("small", "contiguous"), ("small_eval", "contiguous"), ("small_dropout", "contiguous"),
             ("small_dropout", "channels_last"))
OPCHECK = tuple((name, kind) for name in ("small", "small_eval", "small_dropout")
                for kind in ("contiguous", "channels_last"))


def with_dropout(sample: Sample, rate: float = 0.3) -> Sample:
    """The sample with dropout; itself if it has dropout already or is an eval sample (eval drops nothing)."""
    if sample.drop_rate or not sample.training:
        return sample
    return dataclasses.replace(sample, name=f"{sample.name}+dropout", drop_rate=rate)
