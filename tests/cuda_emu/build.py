"""Builds csrc/cuda/*.cu for the CPU emulator in cuda_emu.h and loads them as torch.ops.lightcnn_emu.*.

Each .cu file is rewritten a little, then compiled by the host compiler:
  kernel<<<grid, block, smem, stream>>>(args)  ->  ::cuda_emu::launch_named("kernel", kernel, grid, ...)(args)
  __shared__ T name[n];  /  __shared__ T name;  ->  a per-block buffer from ::cuda_emu::shared<T>(id)
  extern __shared__ ... name[];               ->  the block's dynamic shared memory
  c10::DeviceType::CUDA, .is_cuda()            ->  their CPU twins (a CPU tensor stands for a CUDA one)
  TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) { m.impl(...) }  ->  TORCH_LIBRARY_FRAGMENT(lightcnn_emu, m) { m.def(...) }
  #include "x.cuh" (device helpers: no kernels, no shared memory)  ->  moved after cuda_emu.h
So torch.ops.lightcnn_emu.<op> takes CPU tensors and runs the CUDA code path of torch.ops.lightcnn.<op>: the
host logic, every kernel launch and every kernel, thread by thread. The build defines LIGHTCNN_TEST_INDEX64:
the environment variable of that name then sends the kernels down their 64-bit index paths (indexing.cuh).

Used by tests/test_cuda_emulated.py; by hand: `python tests/cuda_emu/build.py BUILD_DIR` (builds and loads).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
NAMESPACE = "lightcnn_emu"


def _kernel_name_start(src: str, end: int) -> int:
    """The start of the kernel expression that ends just before `end` (`name` or `name<T, U>`)."""
    i = end
    while i > 0 and src[i - 1].isspace():
        i -= 1
    if src[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            depth += {">": 1, "<": -1}.get(src[i], 0)
            if depth == 0:
                break
    while i > 0 and (src[i - 1].isalnum() or src[i - 1] in "_:"):
        i -= 1
    return i


def rewrite_launches(src: str) -> str:
    out, pos = [], 0
    while (start := src.find("<<<", pos)) >= 0:
        stop = src.index(">>>", start)
        name_start = _kernel_name_start(src, start)
        out.append(src[pos:name_start])
        kernel = src[name_start:start].strip()
        name = kernel.split("<")[0].split("::")[-1]
        out.append(f'::cuda_emu::launch_named("{name}", {kernel}, {src[start + 3:stop].strip()})')
        pos = stop + 3
    out.append(src[pos:])
    return "".join(out)


def rewrite_shared(src: str) -> str:
    lines = src.split("\n")
    for n, line in enumerate(lines):
        if "extern __shared__" in line:
            m = re.search(r"extern __shared__(?:\s+__align__\(\d+\))?\s+([\w:<>, ]+?)\s+(\w+)\[\];", line)
            assert m, f"cuda_emu: cannot read the dynamic shared memory declaration: {line!r}"
            lines[n] = line[:m.start()] + f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(::cuda_emu::dynamic_shared());"
        elif "__shared__" in line:
            m = re.search(r"__shared__\s+([\w:<>, ]+?)\s+(\w+)(\[[^\]]+\])?;", line)
            assert m, f"cuda_emu: cannot read the shared memory declaration: {line!r}"
            lines[n] = line[:m.start()] + f"auto& {m[2]} = ::cuda_emu::shared<{m[1]}{m[3] or ''}>({n + 1});"
    return "\n".join(lines)


def rewrite(src: str) -> str:
    lines, device_headers = [], []
    for line in src.split("\n"):
        if re.match(r"\s*#include\s*<(c10/cuda/|ATen/cuda/|cuda)", line):
            continue  # cuda_emu.h stands in for them
        if m := re.match(r'\s*#include\s*"(\w+\.cuh)"', line):
            device_headers.append(m[1])  # device code: after the emulator's macros, below
            continue
        lines.append(line.replace('#include "../', '#include "'))
    # the emulator's macros (threadIdx, min, ...) come after every real header, then the device headers
    last_include = max(i for i, line in enumerate(lines) if line.lstrip().startswith("#include"))
    lines[last_include + 1:last_include + 1] = ['#include "cuda_emu.h"'] + [f'#include "{h}"' for h in device_headers]
    src = "\n".join(lines)
    src = rewrite_shared(rewrite_launches(src))
    src = src.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU").replace(".is_cuda()", ".is_cpu()")
    head, sep, tail = src.partition("TORCH_LIBRARY_IMPL(lightcnn, CUDA, m)")
    if not sep:  # a file of helpers that other .cu files call (per_channel_cuda.cu)
        return src
    return head + f"TORCH_LIBRARY_FRAGMENT({NAMESPACE}, m)" + tail.replace("m.impl(", "m.def(")


# Outlined kernel-address instrumentation: every load and store calls __asan_{load,store}N_noabort(addr),
# which recorder.cu defines (no sanitizer runtime, no shadow memory, no redzones).
RECORD_FLAGS = ["-fsanitize=kernel-address", "--param=asan-instrumentation-with-call-threshold=0",
                "--param=asan-stack=0", "--param=asan-globals=0", "--param=asan-use-after-return=0",
                "-fno-sanitize-address-use-after-scope"]
_loaded = False


def build(build_dir: str | Path, verbose: bool = False) -> None:
    """Rewrites and compiles every csrc/cuda/*.cu (and the emulator's own selftest.cu and recorder.cu) into
    one library and loads it: its ops are then torch.ops.lightcnn_emu.*. Once per process (later calls
    return at once, so test files share the build)."""
    global _loaded
    from torch.utils.cpp_extension import load

    if _loaded:
        return
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in sorted((CSRC / "cuda").glob("*.cu")) + sorted(HERE.glob("*.cu")):
        out = build_dir / f"{cu.stem}_emu.cpp"
        text = rewrite(cu.read_text())
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
        sources.append(str(out))
    load(name="lightcnn_cuda_emu", sources=sources, extra_include_paths=[str(CSRC), str(CSRC / "cuda"), str(HERE)],
         extra_cflags=["-O1", "-Wno-unknown-pragmas", "-DLIGHTCNN_TEST_INDEX64", *RECORD_FLAGS],
         build_directory=str(build_dir), is_python_module=False, verbose=verbose)
    _loaded = True


if __name__ == "__main__":
    build(sys.argv[1], verbose=True)
    print(f"loaded: torch.ops.{NAMESPACE}.*")
