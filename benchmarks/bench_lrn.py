"""LRN kernel vs PyTorch on AlexNet's shapes: forward and forward+backward, side by side in one run.

    python benchmarks/bench_lrn.py                  # CPU, float32
    python benchmarks/bench_lrn.py --device cuda --shapes all --batch-size 128   # GPU (gpu_check.sh)

Variants: `copy` (x.clone(): the memory-bandwidth floor; for forward+backward, a clone in each
direction), `eager` (F.local_response_norm), `compiled` (the same under torch.compile), `kernel`
(lightcnn.ops.local_response_norm, which must be the compiled library: LIGHTCNN_REQUIRE_KERNELS=1 is set).
Targets, CPU: forward+backward >= 1.5x faster than compiled and >= 4x faster than eager;
forward no slower than compiled and within 2.0x of the copy. GPU (every shape, both layouts,
fp32 and bf16): forward <= 1.5x a copy, forward+backward >= 1.5x faster than compiled and >= 4x faster
than eager. Run one layout per process: inductor compiling a channels-last LRN after an NCHW one in the
same process hit an illegal memory access on torch 2.11.
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

# (C, H, W) of the LRNs: AlexNet after conv1 and conv2 (n=5 as in the paper); ZFNet's and GoogLeNet's
# (64 x 56 x 56 and 192 x 56 x 56) complete the GPU set.
SHAPE_SETS = {"alexnet": [(96, 55, 55), (256, 27, 27)],
              "all": [(96, 55, 55), (256, 27, 27), (64, 56, 56), (192, 56, 56)]}
LRN_ARGS = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)


def reference(x):
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return ops.reference.local_response_norm(x, **LRN_ARGS)  # no CPU half pooling: via float32
    return F.local_response_norm(x, **LRN_ARGS)


def kernel(x):
    return ops.local_response_norm(x, **LRN_ARGS)


def bench_shape(shape, device, dtype, rounds, channels_last=False, variants=("copy", "eager", "compiled", "kernel")):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    g = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    compiled = torch.compile(reference, dynamic=False) if "compiled" in variants else None
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
    fwd = {k: v for k, v in fwd.items() if k in variants}
    both = {k: v for k, v in both.items() if k in variants}
    with torch.no_grad():
        t_fwd = time_interleaved(fwd, device, rounds=rounds)
    t_both = time_interleaved(both, device, rounds=rounds)
    return t_fwd, t_both


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 15 CPU, 50 GPU)")
    p.add_argument("--channels-last", action="store_true", help="NHWC inputs")
    p.add_argument("--shapes", default="alexnet", choices=list(SHAPE_SETS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (its targets too)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_lrn: --device cuda needs a CUDA GPU, and none is visible")
    dtype = getattr(torch, args.dtype)
    rounds = args.rounds or (15 if args.device == "cpu" else 50)
    print(f"LRN benchmark on {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), {args.dtype}{', channels-last' if args.channels_last else ''}, "
          f"{LRN_ARGS}, "
          f"median of {rounds} interleaved rounds")
    print(f"backend: {ops.backend_info()['library']}")
    variants = ("copy", "eager", "kernel") if args.no_compile else ("copy", "eager", "compiled", "kernel")
    results, lines = {}, []
    layout = "channels-last" if args.channels_last else "NCHW"
    for chw in SHAPE_SETS[args.shapes]:
        shape = (args.batch_size, *chw)
        t_fwd, t_both = bench_shape(shape, args.device, dtype, rounds, args.channels_last, variants)
        results[str(shape)] = {"forward": t_fwd, "forward_backward": t_both}
        for label, t in (("forward", t_fwd), ("forward+backward", t_both)):
            print(f"\n{shape} {label}: " + "  ".join(f"{k} {v * 1e3:.2f} ms" for k, v in t.items()))
            print("  ratios: " + "  ".join(f"{k}/kernel {v / t['kernel']:.2f}x" for k, v in t.items() if k != "kernel")
                  + f"  kernel/copy {t['kernel'] / t['copy']:.2f}x")
        if args.device == "cpu" and args.no_compile:  # the quick smoke run
            lines += [check(f"{shape} {args.dtype} {layout} fwd+bwd speed-up over eager",
                            t_both["eager"] / t_both["kernel"], ">=", 4.0)]
        elif args.device == "cpu":
            lines += [
                check(f"{shape} fwd+bwd speed-up over compiled", t_both["compiled"] / t_both["kernel"], ">=", 1.5),
                check(f"{shape} fwd+bwd speed-up over eager", t_both["eager"] / t_both["kernel"], ">=", 4.0),
                check(f"{shape} fwd kernel/compiled", t_fwd["kernel"] / t_fwd["compiled"], "<=", 1.0),
                check(f"{shape} fwd kernel/copy", t_fwd["kernel"] / t_fwd["copy"], "<=", 2.0),
            ]
        else:  # GPU targets
            name = f"{shape} {args.dtype} {layout}"
            lines += [check(f"{name} fwd kernel/copy", t_fwd["kernel"] / t_fwd["copy"], "<=", 1.5),
                      check(f"{name} fwd+bwd speed-up over eager", t_both["eager"] / t_both["kernel"], ">=", 4.0)]
            if "compiled" in t_both:
                lines += [check(f"{name} fwd+bwd speed-up over compiled", t_both["compiled"] / t_both["kernel"],
                                ">=", 1.5)]
    print("\nTargets:")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "channels_last": args.channels_last,
                       "results": results, "targets": lines}, f, indent=1)


if __name__ == "__main__":
    main()
