"""Builds csrc/cuda/*.cu for the CPU emulator in cuda_emu.h and loads them as torch.ops.lightcnn_emu.*.

Each .cu file is rewritten a little, then compiled by the host compiler:
  kernel<<<grid, block, smem, stream>>>(args)  ->  ::cuda_emu::launch_named("kernel", kernel, grid, ...)(args)
  __shared__ T name[n];  /  __shared__ T name;  ->  a per-block buffer from ::cuda_emu::shared<T>(id)
  extern __shared__ ... name[];               ->  the block's dynamic shared memory
  c10::DeviceType::CUDA, .is_cuda()            ->  their CPU twins (a CPU tensor stands for a CUDA one)
  TORCH_LIBRARY_IMPL(lightcnn, CUDA, m) { m.impl(...) }  ->  TORCH_LIBRARY_FRAGMENT(lightcnn_emu, m) { m.def(...) }
  #include "x.cuh" (device helpers: no kernels, no shared memory)  ->  moved after cuda_emu.h
  #include "indexing.cuh"                     ->  #include "index64.h" (it includes indexing.cuh and adds
                                                  the LIGHTCNN_TEST_INDEX64 switch to the 64-bit index paths)
So torch.ops.lightcnn_emu.<op> takes CPU tensors and runs the CUDA code path of torch.ops.lightcnn.<op>: the
host logic, every kernel launch and every kernel, thread by thread. See README.md in this folder.

The library is built once per content: into cache_root()/<hash of the sources, headers and flags>, under a
file lock; later runs, in any process, only load it.

Used by tests/test_cuda_emulated.py, tests/test_cuda_emu.py and tests/test_gpu_model.py; by hand:
`python tests/cuda_emu/build.py [BUILD_DIR]` (builds, into the cache without BUILD_DIR, and loads).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HERE = Path(__file__).resolve().parent
NAMESPACE = "lightcnn_emu"
# production headers and the test headers of this folder that stand in for them (each includes its original)
STAND_INS = {"indexing.cuh": "index64.h"}


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
            device_headers.append(STAND_INS.get(m[1], m[1]))  # device code: after the emulator's macros, below
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
CFLAGS = ["-O1", "-Wno-unknown-pragmas", *RECORD_FLAGS]
LIBRARY = "lightcnn_cuda_emu"
_loaded = False


def cache_root() -> Path:
    """Where the builds are kept between runs: $LIGHTCNN_CUDA_EMU_CACHE, else $XDG_CACHE_HOME/lightcnn/cuda_emu
    (~/.cache/lightcnn/cuda_emu). Any of its folders may be deleted at any time."""
    if env := os.environ.get("LIGHTCNN_CUDA_EMU_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightcnn" / "cuda_emu"


def _sources() -> dict[str, str]:
    """The rewritten translation units: {file name in the build folder: text}."""
    return {f"{cu.stem}_emu.cpp": rewrite(cu.read_text())
            for cu in sorted((CSRC / "cuda").glob("*.cu")) + sorted(HERE.glob("*.cu"))}


def build_key(sources: dict[str, str]) -> str:
    """A hash of everything the library is made from: the rewritten sources, every header they can include
    (csrc/ and this folder), the flags, torch's version, the compiler and the Python ABI."""
    import sysconfig

    import torch

    h = hashlib.sha256()
    headers = [p for d in (CSRC, CSRC / "cuda", HERE) for p in sorted(d.iterdir()) if p.suffix in (".h", ".cuh")]
    parts = [*(f"{n}\0{t}" for n, t in sorted(sources.items())), *(f"{p.name}\0{p.read_text()}" for p in headers),
             " ".join(CFLAGS), torch.__version__, os.environ.get("CXX", "c++"), sysconfig.get_config_var("SOABI") or ""]
    for part in parts:
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (released by the OS if the holder dies)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(build_dir: str | Path | None = None, verbose: bool = False) -> Path:
    """Rewrites and compiles every csrc/cuda/*.cu (and the emulator's own selftest.cu and recorder.cu) into
    one library and loads it: its ops are then torch.ops.lightcnn_emu.*. Returns the build folder.

    Without `build_dir` the library is built once into cache_root()/<build_key()> and later runs (any
    process) only load it; a file lock there makes a second process that arrives during the build wait for
    it instead of compiling too. With `build_dir`, torch.utils.cpp_extension builds there (ninja recompiles
    what changed). Once per process: later calls return at once, so test files share the build."""
    global _loaded
    from torch.utils.cpp_extension import load

    sources = _sources()
    folder = Path(build_dir) if build_dir is not None else cache_root() / build_key(sources)
    if _loaded:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    library, done = folder / f"{LIBRARY}.so", folder / "complete"
    with _locked(folder / "build.lock"):
        if build_dir is None and done.exists() and library.exists():
            import torch

            torch.ops.load_library(str(library))
        else:
            done.unlink(missing_ok=True)
            for name, text in sources.items():
                out = folder / name
                if not out.exists() or out.read_text() != text:  # unchanged files keep their time: no rebuild
                    out.write_text(text)
            load(name=LIBRARY, sources=[str(folder / n) for n in sources],
                 extra_include_paths=[str(CSRC), str(CSRC / "cuda"), str(HERE)], extra_cflags=CFLAGS,
                 build_directory=str(folder), is_python_module=False, verbose=verbose)
            done.touch()
    _loaded = True
    return folder


if __name__ == "__main__":
    print(f"built in {build(sys.argv[1] if len(sys.argv) > 1 else None, verbose=True)}; "
          f"loaded: torch.ops.{NAMESPACE}.*")
