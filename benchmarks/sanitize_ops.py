"""Every lightcnn kernel, forward and backward, on each sample of its op's table (tests/samples_<op>.py): the
workload that benchmarks/gpu_check.sh runs under NVIDIA's compute-sanitizer (memcheck, racecheck, synccheck),
which sees what the CPU emulator of tests/cuda_emu cannot: real out-of-bounds accesses, races between real
warps, barriers misused on the hardware.

    python benchmarks/sanitize_ops.py --sanitizer racecheck   # itself under compute-sanitizer: MET/MISSED
    python benchmarks/sanitize_ops.py                         # the cases alone, on the GPU
    python benchmarks/sanitize_ops.py --device cpu            # the same calls on the CPU kernels (a smoke test)

Each case checks its result against the reference ops (so a kernel that runs clean but computes wrong
still fails); exit status 1 on any mismatch. Imports neither jsonargparse nor wandb.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # lightcnn and the tests' sample tables without installing them
    sys.path.insert(0, str(ROOT))

from lightcnn import ops  # noqa: E402
from lightcnn.ops import reference  # noqa: E402
from tests import samples_bn_relu_conv, samples_dense, samples_lrn  # noqa: E402

LRN_SHAPES_SIZES = (*((shape, size) for shape in samples_lrn.CUDA_SHAPES for size in samples_lrn.CUDA_SIZES),
                    *samples_lrn.GPU_SHAPES_SIZES)
LRN_ARGS = dict(alpha=1e-2, beta=0.75, k=2.0)


def lrn_cases(device, dtypes):
    """Every sample kind of tests/samples_lrn.py (NaN/Inf included) on its CUDA shapes and window sizes, both
    layouts, both channels-last designs; checked with the samples' own comparison (assert_lrn_close)."""
    for dtype in dtypes:
        for shape, size in LRN_SHAPES_SIZES:
            for sample in samples_lrn.SAMPLES:
                for kind in ("contiguous", "channels_last"):
                    x = samples_bn_relu_conv.layout(samples_lrn.lrn_sample(sample, shape, dtype, device), kind)
                    g = torch.randn(shape, dtype=torch.float64).to(device, dtype)
                    for variant in ("default", "column"):
                        if variant == "column":
                            os.environ["LIGHTCNN_CUDA_LRN_CHANNELS_LAST"] = "column"
                        xk = x.detach().clone().requires_grad_()
                        yk = ops.local_response_norm(xk, size, **LRN_ARGS)
                        yk.backward(g)
                        os.environ.pop("LIGHTCNN_CUDA_LRN_CHANNELS_LAST", None)
                        y, y64, dx, dx64 = samples_lrn.lrn_references(x, size, g, **LRN_ARGS)
                        tol = samples_lrn.TOL[dtype]
                        yield f"lrn {dtype} {shape} {sample} {kind} {variant}", [
                            functools.partial(samples_lrn.assert_lrn_close, yk, y, y64, **tol),
                            functools.partial(samples_lrn.assert_lrn_close, xk.grad, dx, dx64, **tol)]


def _close(got, want, tol):
    """A check: max |got - want| / max(max |want|, 1) within tol."""
    def check():
        err = (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1.0)
        assert err <= tol, f"relative error {err:.3g}"
    return check


def _run(fn, args, leaves):
    """fn(**args.functional()) with fresh running statistics and gradients of `leaves` (argument names):
    (output, input or feature gradients)."""
    kw = args.functional()
    kw.update(running_mean=kw["running_mean"].clone(), running_var=kw["running_var"].clone())
    for n in leaves:
        kw[n] = [f.detach().clone().requires_grad_() for f in kw[n]] if n == "features" else \
            kw[n].detach().clone().requires_grad_()
    out = fn(**kw)
    out.sum().backward()
    grads = torch.cat([f.grad for f in kw["features"]], 1) if "features" in leaves else kw["input"].grad
    return out, grads


def bn_relu_conv_cases(device, dtypes):
    """Every sample of tests/samples_bn_relu_conv.py (each training one also with dropout) in every layout,
    with both designs of the CUDA reductions."""
    for dtype in dtypes:
        for base in samples_bn_relu_conv.SAMPLES.values():
            for sample in dict.fromkeys([base, samples_bn_relu_conv.with_dropout(base)]):
                for kind in samples_bn_relu_conv.LAYOUTS:
                    args = sample.make(dtype, kind, device)
                    for variant in ("default", "aten"):
                        if variant == "aten":  # the other design of the reductions (ATen's SyncBatchNorm kernels)
                            os.environ["LIGHTCNN_CUDA_BN_REDUCTIONS"] = "aten"
                        got = _run(ops.bn_relu_conv2d, args, ["input"])
                        os.environ.pop("LIGHTCNN_CUDA_BN_REDUCTIONS", None)
                        want = _run(reference.bn_relu_conv2d, args.double(), ["input"])
                        yield f"bn_relu_conv2d {dtype} {sample} {kind} {variant}", [
                            _close(a, b, TOL[dtype]) for a, b in zip(got, want)]


def dense_cases(device, dtypes):
    """Every sample of tests/samples_dense.py in every layout."""
    for dtype in dtypes:
        for sample in samples_dense.SAMPLES.values():
            for kind in samples_dense.KINDS:
                args = sample.make(dtype, kind, device)
                got = _run(ops.dense_bn_relu_conv2d, args, ["features"])
                want = _run(reference.dense_bn_relu_conv2d, args.double(), ["features"])
                yield f"dense_bn_relu_conv2d {dtype} {sample} {kind}", [
                    _close(a, b, TOL[dtype]) for a, b in zip(got, want)]


TOL = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def under_sanitizer(tool: str) -> int:
    """Runs this script's cases under `compute-sanitizer --tool TOOL`, checking lightcnn's kernels only
    (cuDNN's and ATen's run uninstrumented), and prints the verdict as a MET/MISSED line."""
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    exe = shutil.which("compute-sanitizer") or next(
        (p for r in roots if r for p in (f"{r}/bin/compute-sanitizer", f"{r}/compute-sanitizer/compute-sanitizer")
         if os.path.exists(p)), None)
    if exe is None:
        print(f"MISSED: compute-sanitizer {tool}: compute-sanitizer is not on PATH (it ships with the CUDA toolkit)")
        return 1
    cmd = [exe, "--tool", tool, "--kernel-name", "kns=lightcnn", "--error-exitcode", "1", sys.executable,
           os.path.abspath(__file__), "--device", "cuda"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    out = (r.stdout + r.stderr).strip().splitlines()
    summary = next((line for line in reversed(out) if "ERROR SUMMARY" in line), "no ERROR SUMMARY line")
    cases = next((line for line in reversed(out) if line.startswith("sanitize_ops.py:")), "")
    if r.returncode == 0:
        print(f"MET: compute-sanitizer {tool}: {summary.strip('= ')}; {cases}")
        return 0
    print("\n".join(out[-40:]))
    print(f"MISSED: compute-sanitizer {tool}: exit {r.returncode}, {summary.strip('= ')}")
    return 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sanitizer", choices=["memcheck", "racecheck", "synccheck", "initcheck"],
                   help="run the cases under compute-sanitizer with this tool and print MET/MISSED")
    args = p.parse_args()
    if args.sanitizer:
        return under_sanitizer(args.sanitizer)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops.py: no CUDA GPU here; use --device cpu for the smoke test", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [torch.float32, torch.bfloat16] if args.device == "cuda" else [torch.float32]
    failures = cases = 0
    for gen in (lrn_cases, bn_relu_conv_cases, dense_cases):
        for name, checks in gen(args.device, dtypes):
            cases += 1
            for check in checks:
                try:
                    check()
                except AssertionError as e:
                    failures += 1
                    print(f"MISMATCH {name}: {str(e).splitlines()[0]}")
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_ops.py: {cases} cases, {failures} mismatches (library {ops.backend_info()['library']})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
