"""Every lightcnn kernel once, forward and backward, on small odd shapes: the workload that
benchmarks/gpu_check.sh runs under NVIDIA's compute-sanitizer (memcheck, racecheck, synccheck), which sees
what the CPU emulator of tests/cuda_emu cannot: real out-of-bounds accesses, races between real warps,
barriers misused on the hardware.

    python benchmarks/sanitize_ops.py --sanitizer racecheck   # itself under compute-sanitizer: MET/MISSED
    python benchmarks/sanitize_ops.py                         # the cases alone, on the GPU
    python benchmarks/sanitize_ops.py --device cpu            # the same calls on the CPU kernels (a smoke test)

Each case checks its result against the reference ops (so a kernel that runs clean but computes wrong
still fails); exit status 1 on any mismatch. Imports neither jsonargparse nor wandb.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import torch

from lightcnn import ops
from lightcnn.ops import reference

FORMATS = (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last))


def lrn_cases(device, dtypes):
    for dtype in dtypes:
        for shape, size in (((3, 96, 7, 5), 5), ((2, 300, 3, 3), 4), ((2, 7, 5, 3), 12)):
            for name, fmt in FORMATS:
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                for variant in ("default", "column"):
                    if variant == "column":
                        os.environ["LIGHTCNN_CUDA_LRN_CHANNELS_LAST"] = "column"
                    xk = x.detach().clone().requires_grad_()
                    yk = ops.local_response_norm(xk, size, 1e-2, 0.75, 2.0)
                    yk.sum().backward()
                    os.environ.pop("LIGHTCNN_CUDA_LRN_CHANNELS_LAST", None)
                    xr = x.detach().double().requires_grad_()
                    yr = reference.local_response_norm(xr, size, 1e-2, 0.75, 2.0)
                    yr.sum().backward()
                    yield f"lrn {dtype} {shape} {name} {variant}", [(yk, yr), (xk.grad, xr.grad)]


def bn_relu_conv_cases(device, dtypes):
    for dtype in dtypes:
        for shape in ((2, 6, 5, 4), (3, 37, 1, 3), (2, 3, 64, 64)):
            for name, fmt in FORMATS:
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                for drop, variant in ((0.0, "default"), (0.3, "default"), (0.0, "aten"), (0.3, "aten")):
                    if variant == "aten":  # the other design of the reductions (ATen's SyncBatchNorm kernels)
                        os.environ["LIGHTCNN_CUDA_BN_REDUCTIONS"] = "aten"
                    C = shape[1]
                    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
                    cw = torch.randn(4, C, 3, 3, device=device, dtype=dtype)
                    mask = torch.rand(shape, device=device) >= drop if drop else None
                    outs = []
                    for fn, dt in ((ops.bn_relu_conv2d, dtype), (reference.bn_relu_conv2d, torch.float64)):
                        xi = x.detach().to(dt).requires_grad_()
                        wd, bd = (w.to(dt), b.to(dt)) if dt == torch.float64 else (w, b)
                        out = fn(xi, None, None, wd, bd, cw.to(dt), None, padding=1, training=True, drop_rate=drop,
                                 drop_mask=mask)
                        out.sum().backward()
                        outs.append((out, xi.grad))
                    os.environ.pop("LIGHTCNN_CUDA_BN_REDUCTIONS", None)
                    yield f"bn_relu_conv2d {dtype} {shape} {name} drop {drop} {variant}", list(zip(*outs))


def dense_cases(device, dtypes):
    for dtype in dtypes:
        for channels, hw in (([4, 2, 3], (5, 4)), ([1] * 35 + [2] * 35, (2, 3)), ([2, 3], (64, 64))):
            for name, fmt in FORMATS:
                feats = [torch.randn(2, c, *hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
                         for c in channels]
                C = sum(channels)
                w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
                cw = torch.randn(3, C, 1, 1, device=device, dtype=dtype)
                outs = []
                for fn, dt in ((ops.dense_bn_relu_conv2d, dtype), (reference.dense_bn_relu_conv2d, torch.float64)):
                    fi = [f.detach().to(dt).requires_grad_() for f in feats]
                    wd, bd = (w.to(dt), b.to(dt)) if dt == torch.float64 else (w, b)
                    out = fn(fi, None, None, wd, bd, cw.to(dt), training=True)
                    out.sum().backward()
                    outs.append((out, torch.cat([f.grad for f in fi], 1)))
                yield f"dense_bn_relu_conv2d {dtype} {len(channels)} features {hw} {name}", list(zip(*outs))


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
        for name, pairs in gen(args.device, dtypes):
            cases += 1
            for got, want in pairs:
                want = want.double()
                err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
                if not err <= TOL[got.dtype]:
                    failures += 1
                    print(f"MISMATCH {name}: relative error {err:.3g}")
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_ops.py: {cases} cases, {failures} mismatches (library {ops.backend_info()['library']})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
