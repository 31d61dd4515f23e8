"""Shared fixtures: tests run on the CPU, quietly, never touch a network, and CUDA twins skip cleanly.

`python -m pytest` without paths runs the suite on worker processes (pytest-xdist, from the `test` extra: one
per core, at most 4, one torch thread each, a whole file per worker so that module fixtures are built once; the
files parametrised by model name, a whole model per worker).
Named files, `-n N`, `--pdb` and `-p no:xdist` run as asked; without pytest-xdist the suite runs in one process.
"""
import gc
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Test files that share a per-process build (the CUDA emulator library): one worker runs them all.
SHARED_WORKER = {f"tests/{name}.py": "tests/test_cuda_emulated.py" for name in ("test_gpu_model", "test_cuda_emu")}
# Files parametrised by model name whose tests share per-process meta builds (tests.helpers.meta_model): the
# workers share the file, each model's tests run on one of them.
BY_MODEL = {"tests/test_model_api.py", "tests/test_flops.py"}


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")  # a worker itself
            or config.option.numprocesses is not None
            or config.args_source != pytest.Config.ArgsSource.TESTPATHS or config.getoption("usepdb")):
        return
    workers = min(os.cpu_count() or 1, 4)
    if workers > 1:
        config.option.numprocesses = workers
        if config.option.dist == "no":
            config.option.dist = "loadfile"


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown where xdist is absent or off (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    if config.option.dist != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedBuildScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            scope = super()._split_scope(nodeid)
            if scope in BY_MODEL and nodeid.endswith("]"):
                return f"{scope}[{nodeid.rsplit('[', 1)[1]}"
            return SHARED_WORKER.get(scope, scope)

    return SharedBuildScheduling(config, log)


# Python's cyclic garbage collector: the imported libraries (torch, Lightning, timm, sympy) leave millions of
# long-lived objects that every full collection would walk again. Once the tests are collected they are frozen
# (never walked again), and collections run less often (docs/testing.md has the figures).
gc.set_threshold(10_000, 20, 20)


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # the workers share the cores: no oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

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
    flags = lambda: (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    before = flags()
    yield
    if flags() != before:  # only when changed: the call is slow
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
