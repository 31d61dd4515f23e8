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


@pytest.fixture(autouse=True)
def _restore_global_torch_flags():
    """A test's Trainer(deterministic=True) switches torch's deterministic mode on for the whole process;
    later tests must not inherit it (max_unpool2d, for one, refuses to run under it)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
