"""The GPU performance model (benchmarks/gpu_model.py on the CUDA emulator) and the "auto" choice that
follows from what a GPU has measured."""
from __future__ import annotations

import pytest
import torch

from lightcnn import layers, ops
from lightcnn.ops import _library, dense
from lightcnn.ops._library import Config

DENSE_AUTO = [
    (Config("cpu", torch.float32), "kernel"),  # measured on the CPU: 0.96x the step time, less memory
    (Config("cpu", torch.float64, channels_last=True), "kernel"),
    (Config("cpu", torch.float32, torch.bfloat16), "kernel"),
    (Config("cpu", torch.bfloat16), "reference"),  # no CPU bf16 kernel
    # CUDA: never timed on a GPU against the reference, so the reference in every configuration
    (Config("cuda", torch.float32), "reference"),
    (Config("cuda", torch.float32, tf32=True), "reference"),
    (Config("cuda", torch.float32, torch.bfloat16, channels_last=True), "reference"),
    (Config("cuda", torch.float64), "reference"),
    (Config("cuda", torch.bfloat16, channels_last=True), "reference"),
    (Config("cuda", torch.float16), "reference"),
]


@pytest.mark.parametrize("cfg, expected", DENSE_AUTO, ids=[str(c) for c, _ in DENSE_AUTO])
def test_dense_auto_takes_the_reference_on_cuda_until_a_gpu_measures_the_kernel(cfg, expected):
    assert ("kernel" if _library.auto_uses_kernel(dense.OP, cfg) else "reference") == expected


def test_backend_info_says_why_the_dense_op_runs_the_reference_on_cuda():
    table = ops.backend_info()["ops"]["dense_bn_relu_conv2d"]
    assert {v for k, v in table["auto"].items() if k.startswith("cuda")} == {"reference"}
    assert {v for k, v in table["auto"].items() if k.startswith("cpu")} == {"kernel"}
    assert "never timed on a GPU" in table["auto_reason"]
    layer = layers.backend_info()["layers"]["DenseConv2d"]
    assert layer["auto"] == table["auto"] and layer["auto_reason"] == table["auto_reason"]
