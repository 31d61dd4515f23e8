"""The CUDA emulator of tests/cuda_emu as a tool: its source rewriter (pure text, no compiler), its build cache,
and its intrinsics, built-in variables and checks, each against the result the GPU gives (the kernels of
tests/cuda_emu/selftest.cu, run through torch.ops.lightcnn_emu.emu_selftest)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cuda_emu import build as emu_build

# ---------------------------------------------------------------- the rewriter


def test_launches_become_named_emulator_launches():
    src = "k<<<grid, block>>>(a, b); ns::t<float, 4> <<<g, b, smem, stream>>>(x);"
    assert emu_build.rewrite_launches(src) == (
        '::cuda_emu::launch_named("k", k, grid, block)(a, b); '
        '::cuda_emu::launch_named("t", ns::t<float, 4>, g, b, smem, stream)(x);')


def test_nested_template_arguments_stay_with_the_kernel():
    src = "  kern<Pair<int, float>, 8><<<1, 32>>>(p);"
    assert emu_build.rewrite_launches(src) == '  ::cuda_emu::launch_named("kern", kern<Pair<int, float>, 8>, 1, 32)(p);'


def test_shared_declarations_become_per_block_buffers():
    src = "a\n  __shared__ float partial[32];\n  __shared__ double total;\n" \
          "  extern __shared__ __align__(16) unsigned char buf[];"
    assert emu_build.rewrite_shared(src).split("\n") == [
        "a",
        "  auto& partial = ::cuda_emu::shared<float[32]>(2);",  # keyed by the line: one buffer per declaration
        "  auto& total = ::cuda_emu::shared<double>(3);",
        "  unsigned char* buf = reinterpret_cast<unsigned char*>(::cuda_emu::dynamic_shared());",
    ]


def test_an_unreadable_shared_declaration_fails_clearly():
    with pytest.raises(AssertionError, match="cannot read the shared memory declaration"):
        emu_build.rewrite_shared("__shared__ float a[4], b[4];")


def test_a_cu_file_becomes_a_cpu_translation_unit():
    src = "\n".join([
        "#include <ATen/core/Tensor.h>",
        "#include <c10/cuda/CUDAGuard.h>",
        "#include <cuda_runtime.h>",
        '#include "../lrn.h"',
        '#include "indexing.cuh"',
        '#include "warp.cuh"',
        "void f(const at::Tensor& x) {",
        "  TORCH_CHECK(x.is_cuda() && x.device().type() == c10::DeviceType::CUDA);",
        "}",
        "TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) {",
        '  m.impl("lrn", &f);',
        "}",
    ])
    assert emu_build.rewrite(src).split("\n") == [
        "#include <ATen/core/Tensor.h>",
        '#include "lrn.h"',
        '#include "cuda_emu.h"',  # after every real header: its macros (threadIdx, min, ...) must not reach them
        '#include "index64.h"',  # the stand-in for indexing.cuh
        '#include "warp.cuh"',
        "void f(const at::Tensor& x) {",
        "  TORCH_CHECK(x.is_cpu() && x.device().type() == c10::DeviceType::CPU);",
        "}",
        "TORCH_LIBRARY_FRAGMENT(lightcnn_emu, m) {",
        '  m.def("lrn", &f);',
        "}",
    ]


def test_a_file_of_helpers_keeps_its_namespace():
    src = '#include <ATen/core/Tensor.h>\n#include "per_channel.h"\nvoid helper() { k<<<1, 1>>>(); }'
    out = emu_build.rewrite(src)
    assert "TORCH_LIBRARY" not in out and '::cuda_emu::launch_named("k", k, 1, 1)()' in out


def test_the_production_index_header_carries_no_test_switch():
    text = (emu_build.CSRC / "cuda" / "indexing.cuh").read_text()
    assert "LIGHTCNN_TEST" not in text and "getenv" not in text


# ---------------------------------------------------------------- the build cache


def test_build_key_follows_the_sources():
    sources = emu_build._sources()
    key = emu_build.build_key(sources)
    assert key == emu_build.build_key(dict(sources))
    changed = dict(sources, **{"lrn_cuda_emu.cpp": sources["lrn_cuda_emu.cpp"] + "\n// edited"})
    assert emu_build.build_key(changed) != key


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTCNN_CUDA_EMU_CACHE", str(tmp_path))
    assert emu_build.cache_root() == tmp_path
    monkeypatch.delenv("LIGHTCNN_CUDA_EMU_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert emu_build.cache_root() == tmp_path / "xdg" / "lightcnn" / "cuda_emu"


def test_the_build_lock_excludes_another_process(tmp_path):
    """While one process builds (holds the lock), another cannot take it: it waits instead of compiling too."""
    lock = tmp_path / "build.lock"
    probe = ("import fcntl, sys\nwith open(sys.argv[1], 'a+') as f:\n    try:\n"
             "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    except BlockingIOError:\n"
             "        print('held')\n    else:\n        print('free')\n")

    def other_process_sees():
        return subprocess.run([sys.executable, "-c", probe, str(lock)], capture_output=True, text=True,
                              timeout=60).stdout.strip()

    with emu_build._locked(lock):
        assert other_process_sees() == "held"
    assert other_process_sees() == "free"


@pytest.fixture(scope="module")
def emu():
    emu_build.build()
    return torch.ops.lightcnn_emu


def test_a_second_process_loads_the_cached_build_without_compiling(emu):
    folder = emu_build.cache_root() / emu_build.build_key(emu_build._sources())
    assert (folder / "complete").exists()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix in (".o", ".so", ".cpp")}
    code = ("import torch; from tests.cuda_emu.build import build; build(); "
            "print(torch.ops.lightcnn_emu.emu_selftest(torch.ones(64), 0)[0].item())")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "64.0"
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.suffix in (".o", ".so", ".cpp")}
    assert after == before  # nothing rewritten, compiled or linked


# ---------------------------------------------------------------- the execution model and its intrinsics


def test_a_correct_block_reduction(emu):
    x = torch.randn(1000)
    assert emu.emu_selftest(x, 0)[0].item() == pytest.approx(x.sum().item(), rel=1e-5, abs=1e-4)


def test_a_missing_barrier_shows_in_the_results(emu):
    x = torch.arange(64, dtype=torch.float32)
    y = emu.emu_selftest(x, 1)
    # a thread read its neighbour's shared slot before the neighbour wrote it: poison (NaN) or a wrong value
    assert not torch.equal(y, x.roll(-1))


def test_shuffle_down_within_a_partial_mask_and_width(emu):
    lanes = torch.arange(32.0)
    expected = torch.where(lanes < 15, lanes + 1, lanes)  # lanes 16-31 do not shuffle; lane 15: beyond width 16
    assert torch.equal(emu.emu_selftest(torch.zeros(32), 6), expected)


def test_shuffle_down_beyond_the_width_keeps_the_own_value(emu):
    lanes = torch.arange(32.0)
    expected = torch.where(lanes % 8 + 3 < 8, lanes + 3, lanes)
    assert torch.equal(emu.emu_selftest(torch.zeros(32), 7), expected)


def test_built_in_variables_of_a_3d_block_in_a_2d_grid(emu):
    expected = torch.tensor([x + 10 * y + 100 * z + 1000 * bx + 10000 * by
                             for by in range(3) for bx in range(2)
                             for z in range(2) for y in range(3) for x in range(4)], dtype=torch.float32)
    assert torch.equal(emu.emu_selftest(torch.zeros(6 * 24), 8), expected)


def test_atomic_add_from_every_thread_of_several_blocks(emu):
    x = torch.arange(200.0)  # 4 blocks of 64 threads: the last 56 threads add nothing
    assert emu.emu_selftest(x, 9)[0].item() == x.sum().item()


@pytest.mark.parametrize("divisor", [1, 3, 7, 64, 1000, 12345])
def test_fast_div_and_umulhi_divide_exactly(emu, divisor):
    n = torch.cat([torch.tensor([divisor]), torch.randint(0, 2 ** 24, (299,)), torch.tensor([2 ** 24 - 1])])
    y = emu.emu_selftest(n.float(), 10)
    assert torch.equal(y[1:].long(), n[1:] // divisor)


def test_dynamic_shared_memory_and_a_barrier(emu):
    x = torch.randn(64)
    assert torch.equal(emu.emu_selftest(x, 11), x.flip(0))


def test_unwritten_shared_memory_reads_as_nan(emu):
    assert emu.emu_selftest(torch.zeros(32), 12).isnan().all()


@pytest.mark.parametrize("case, match", [
    (2, "deadlock: lanes wait at a warp shuffle"),
    (3, "names lanes that do not exist in a block of 48 threads"),
    (4, "1 to 1024 threads per block"),
    (5, "lane 15 reads lane 16, which its mask 0x0000ffff does not name"),
    (13, "50176 bytes of dynamic shared memory; above 48 KiB"),
    (14, r"invalid grid \(1, 65536, 1\)"),
])
def test_misuse_is_reported(emu, case, match):
    with pytest.raises(RuntimeError, match=match):
        emu.emu_selftest(torch.zeros(64), case)
