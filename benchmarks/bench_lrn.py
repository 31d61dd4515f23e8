"""LRN kernel vs PyTorch on AlexNet's shapes: forward and forward+backward, side by side in one run.

    python benchmarks/bench_lrn.py                  # CPU, float32
    python benchmarks/bench_lrn.py --device cuda    # GPU (benchmarks/gpu_check.sh runs this)

Variants: `copy` (x.clone(): the memory-bandwidth floor; for forward+backward, a clone in each
direction), `eager` (F.local_response_norm), `compiled` (the same under torch.compile), `kernel`
(lightcnn.ops.local_response_norm, which must be the compiled library: LIGHTCNN_REQUIRE_KERNELS=1 is set).
Targets (issue 2), CPU: forward+backward >= 1.5x faster than compiled and >= 4x faster than eager;
forward no slower than compiled and within 2.0x of the copy. GPU: faster than eager and compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

os.environ["LIGHTCNN_REQUIRE_KERNELS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import check, time_interleaved  # noqa: E402

import lightcnn.ops as ops  # noqa: E402

# AlexNet: LRN after conv1 (96 x 55 x 55) and conv2 (256 x 27 x 27), batch 32; n=5 as in the paper.
SHAPES = [(32, 96, 55, 55), (32, 256, 27, 27)]
LRN_ARGS = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)


def reference(x):
    return F.local_response_norm(x, **LRN_ARGS)


def kernel(x):
    return ops.local_response_norm(x, **LRN_ARGS)


def bench_shape(shape, device, dtype, rounds, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    compiled = torch.compile(reference, dynamic=False)
    fwd = {
        "copy": lambda: x.clone(),
        "eager": lambda: reference(x),
        "compiled": lambda: compiled(x),
        "kernel": lambda: kernel(x),
    }
    xg = x.clone().requires_grad_(True)

    def fwd_bwd(fn):
        def run():
            y = fn(xg)
            y.backward(g)
            xg.grad = None
        return run

    both = {
        "copy": lambda: (x.clone(), g.clone()),
        "eager": fwd_bwd(reference),
        "compiled": fwd_bwd(compiled),
        "kernel": fwd_bwd(kernel),
    }
    with torch.no_grad():
        t_fwd = time_interleaved(fwd, device, rounds=rounds)
    t_both = time_interleaved(both, device, rounds=rounds)
    return t_fwd, t_both


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 15 CPU, 50 GPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC inputs (the targets are set for NCHW)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_lrn: --device cuda needs a CUDA GPU, and none is visible")
    dtype = getattr(torch, args.dtype)
    rounds = args.rounds or (15 if args.device == "cpu" else 50)
    print(f"LRN benchmark on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.dtype}{', channels-last' if args.channels_last else ''}, {LRN_ARGS}, median of {rounds} interleaved rounds")
    print(f"backend: {ops.backend_info()['library']}")
    results, lines = {}, []
    for shape in SHAPES:
        t_fwd, t_both = bench_shape(shape, args.device, dtype, rounds, args.channels_last)
        results[str(shape)] = {"forward": t_fwd, "forward_backward": t_both}
        for label, t in (("forward", t_fwd), ("forward+backward", t_both)):
            print(f"\n{shape} {label}: " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))
            print("  ratios: " + "  ".join(f"{k}/kernel {v / t['kernel']:.2f}x" for k, v in t.items() if k != "kernel")
                  + f"  kernel/copy {t['kernel'] / t['copy']:.2f}x")
        if args.device == "cpu":
            lines += [
                check(f"{shape} fwd+bwd speed-up over compiled", t_both["compiled"] / t_both["kernel"], ">=", 1.5),
                check(f"{shape} fwd+bwd speed-up over eager", t_both["eager"] / t_both["kernel"], ">=", 4.0),
                check(f"{shape} fwd kernel/compiled", t_fwd["kernel"] / t_fwd["compiled"], "<=", 1.0),
                check(f"{shape} fwd kernel/copy", t_fwd["kernel"] / t_fwd["copy"], "<=", 2.0),
            ]
        else:
            for label, t in (("fwd", t_fwd), ("fwd+bwd", t_both)):
                lines += [check(f"{shape} {label} speed-up over eager", t["eager"] / t["kernel"], ">=", 1.0),
                          check(f"{shape} {label} speed-up over compiled", t["compiled"] / t["kernel"], ">=", 1.0)]
    print("\nTargets:")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "results": results, "targets": lines}, f, indent=1)


if __name__ == "__main__":
    main()
