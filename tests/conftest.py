"""Shared fixtures: tests run on the CPU, quietly, never touch a network, and CUDA twins skip cleanly."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# CUDA twins: parametrize a test over this to run it on the CPU and (when present) on a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
