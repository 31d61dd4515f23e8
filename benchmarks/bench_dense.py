"""Benchmark of the memory-efficient DenseNet (lightcnn.ops.dense_bn_relu_conv2d + the fused 3x3): one training
step (SGD, Nesterov momentum, weight decay) of DenseNet-121 (ImageNet layout) and DenseNet-BC-190 k=40 (CIFAR
layout, 32x32), four variants of the same network with the same weights initialiser:

  naive         torchvision's DenseNet, memory_efficient=False (a new concatenation and BN-ReLU per layer)
  checkpointed  torchvision's DenseNet, memory_efficient=True (the concatenation, BN, ReLU and 1x1 conv of
                every layer checkpointed and run again in the backward)
  reference     lightcnn's DenseNet, impl="reference" (the naive sequence, our module tree)
  ours          lightcnn's DenseNet, default: DenseConv2d over the list of features + fused 3x3 (BNReLUConv2d)

For DenseNet-BC-190 torchvision's class gets the CIFAR stem (one 3x3 conv; norm0/relu0/pool0 removed), which
makes it the very network of lightcnn's `densenet_bc190_k40` (checked by its parameter count).
Memory: each variant in a fresh subprocess (one training step under the profiler after a warm-up step).
Time (the default `--timing interleaved`): all variants built in one more fresh subprocess and their
training steps interleaved, one step of each per round (benchmarks/_timing.py), medians over --rounds:
on a machine shared with other jobs the load then weighs on every variant alike. `--timing subprocess`
times --steps steps inside each variant's own subprocess instead, over --rounds alternating runs.
Memory, per variant:
  peak    the most memory allocated at once during one training step above what was allocated before it
          (model, gradients kept by zero_grad(set_to_none=False), optimiser state, data): the activation
          memory and the backward's transients. CPU: the running sum of the profiler's allocation events
          (torch.profiler, profile_memory=True); CUDA: torch.cuda.max_memory_allocated().
  rss     CPU only, for the record: peak resident set size of the first step minus the size before it.
Targets: CPU float32: ours' peak <= 0.7x checkpointed's and step time <= 1.0x naive's. GPU, in
bf16 autocast + channels-last and in fp32 with TF32 on: ours' peak <= 0.35x naive's at <= 1.10x its time
(fp32 with TF32 off is reported for the record).

  python benchmarks/bench_dense.py                          # CPU: DenseNet-121 b32 112x112, BC-190 b8
  python benchmarks/bench_dense.py --batch-size 8 --rounds 1     # a quick run
  python benchmarks/bench_dense.py --device cuda --json out.json # GPU, all three modes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]  # bench_bn_relu_conv's helpers; lightcnn without installing it
from bench_bn_relu_conv import (  # noqa: E402  (after the sys.path line above)
    _mib,
    _peak_allocated_cpu,
    _peak_rss_bytes,
    _reset_peak_rss,
    _rss_bytes,
)

VARIANTS = ("naive", "checkpointed", "reference", "ours")
MODELS = ("densenet121", "densenet_bc190_k40")
GPU_MODES = ("bf16_cl", "tf32", "fp32")


def build(variant: str, model_name: str):
    import torch
    from torch import nn

    from lightcnn.models import create

    try:
        import torchvision
    except ImportError:  # a GPU image without torchvision: the naive twin is ours on the reference path
        if variant == "checkpointed":
            raise
        variant = "reference" if variant == "naive" else variant
    if variant in ("reference", "ours"):
        return create(model_name, impl="reference" if variant == "reference" else None)
    ref = create(model_name, impl="reference")  # the configuration to mirror
    tv = torchvision.models.DenseNet(growth_rate=ref.growth_rate, block_config=ref.block_config,
                                     num_init_features=ref.blocks[0].layers[0].bottleneck.bn.num_features,
                                     bn_size=4, num_classes=ref.num_classes,
                                     memory_efficient=variant == "checkpointed")
    if model_name != "densenet121":  # the CIFAR stem
        tv.features.conv0 = nn.Conv2d(3, tv.features.conv0.out_channels, 3, 1, 1, bias=False)
        tv.features.norm0 = tv.features.relu0 = tv.features.pool0 = nn.Identity()
    n_tv, n_ref = (sum(p.numel() for p in m.parameters()) for m in (tv, ref))
    assert n_tv == n_ref, f"torchvision twin of {model_name} has {n_tv} parameters, ours {n_ref}"
    del ref
    torch.manual_seed(0)
    return tv


def make_step(args, variant: str):
    """(model, one training step) of `variant` on the device, mode and batch of `args`."""
    import torch
    import torch.nn.functional as F

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.mode != "fp32"
    channels_last = args.mode == "bf16_cl"
    torch.manual_seed(0)
    model = build(variant, args.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    side = args.image_size if args.model == "densenet121" else 32
    x = torch.randn(args.batch_size, 3, side, side, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=args.mode == "bf16_cl"):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: model state, not step memory
        loss.backward()
        opt.step()

    return model, step


def time_worker(args) -> dict:
    """Median wall-clock and CPU time of a step of every variant, their steps interleaved in one process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = {v: make_step(args, v)[1] for v in args.variants.split(",")}
    for _ in range(max(args.warmup, 1)):
        for step in steps.values():
            step()
    wall: dict[str, list[float]] = {v: [] for v in steps}
    cpu: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(args.rounds):
        for v, step in steps.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    return dict(step_s={v: statistics.median(t) for v, t in wall.items()},
                cpu_s={v: statistics.median(t) for v, t in cpu.items()}, threads=torch.get_num_threads())


def worker(args) -> dict:
    import torch

    from lightcnn.ops import backend_info

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, step = make_step(args, args.variant)
    side = args.image_size if args.model == "densenet121" else 32

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ops = backend_info()["ops"]
    result = dict(variant=args.variant, model=args.model, device=str(device), mode=args.mode,
                  batch_size=args.batch_size, side=side, threads=torch.get_num_threads(), torch=torch.__version__,
                  kernel_compiled=all(ops.get(o, {}).get(device.type, False)
                                      for o in ("dense_bn_relu_conv2d", "bn_relu_conv2d")))
    rss_before, rss_reset = _rss_bytes(), _reset_peak_rss()
    for i in range(max(args.warmup, 1)):
        step()
        if i == 0 and device.type == "cpu" and rss_reset:
            result["rss_first_step_bytes"] = _peak_rss_bytes() - rss_before
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        result["peak_bytes"] = _peak_allocated_cpu(step)
    times = []
    for _ in range(max(args.steps, 1 if device.type == "cuda" else 0)):  # CUDA: one step at least, for the peak
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    result["step_times_s"] = times[:args.steps]
    return result


def run_variant(args, model: str, variant: str, mode: str, batch_size: int, steps: int | None = None) -> dict:
    """One fresh subprocess: `variant`'s memory (and, unless steps=0, its step times); variant "*" times all
    of args.variants interleaved."""
    cmd = [sys.executable, os.path.abspath(__file__), "--models", model, "--device", args.device, "--mode", mode,
           "--batch-size", str(batch_size), "--image-size", str(args.image_size), "--threads", str(args.threads),
           "--steps", str(args.steps if steps is None else steps), "--warmup", str(args.warmup),
           "--rounds", str(args.rounds), "--variants", args.variants]
    cmd += ["--time-worker"] if variant == "*" else ["--worker", variant]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{model} {variant} {mode} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch-size", type=int, default=None, help="DenseNet-121 (CPU 32, CUDA 64)")
    p.add_argument("--cifar-batch-size", type=int, default=None, help="DenseNet-BC-190 (CPU 8, CUDA 64)")
    p.add_argument("--image-size", type=int, default=None, help="DenseNet-121's side (CPU 112, CUDA 224)")
    p.add_argument("--modes", default=None, help=f"CUDA: some of {','.join(GPU_MODES)} (CPU: fp32 only)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="runs per variant, alternating between variants")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--timing", default="interleaved", choices=("interleaved", "subprocess"))
    p.add_argument("--worker", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    p.add_argument("--time-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.image_size = args.image_size or (224 if gpu else 112)
    if args.variant or args.time_worker:
        args.model = args.models
        print(json.dumps(time_worker(args) if args.time_worker else worker(args)))
        return 0

    batch = {"densenet121": args.batch_size or (64 if gpu else 32),
             "densenet_bc190_k40": args.cifar_batch_size or (64 if gpu else 8)}
    modes = (args.modes or ",".join(GPU_MODES)).split(",") if gpu else ["fp32"]
    variants = [v for v in args.variants.split(",") if v]
    models = [m for m in args.models.split(",") if m]
    ok, summary = True, {}
    for model in models:
        for mode in modes:
            runs: dict[str, list[dict]] = {v: [] for v in variants}
            interleaved = args.timing == "interleaved"
            for r in range(1 if interleaved else args.rounds):
                for v in variants:
                    runs[v].append(run_variant(args, model, v, mode, batch[model], 0 if interleaved else None))
                    print(f"{model} {mode} round {r + 1} {v}: steps "
                          f"{[f'{t:.3f}' for t in runs[v][-1]['step_times_s']]} s, "
                          f"peak {_mib(runs[v][-1]['peak_bytes'])} MiB", file=sys.stderr)
            if interleaved:
                timed = run_variant(args, model, "*", mode, batch[model])
                print(f"{model} {mode} interleaved medians: wall {timed['step_s']}, CPU {timed['cpu_s']}",
                      file=sys.stderr)
                for v in variants:
                    runs[v][0]["step_times_s"] = [timed["step_s"][v]]
                    runs[v][0]["cpu_s"] = timed["cpu_s"][v]
            s = {v: dict(step_s=statistics.median(t for r in rs for t in r["step_times_s"]),
                         peak_bytes=statistics.median(r["peak_bytes"] for r in rs),
                         rss_first_step_bytes=statistics.median(r.get("rss_first_step_bytes") or 0 for r in rs),
                         cpu_s=rs[0].get("cpu_s"), kernel_compiled=rs[0]["kernel_compiled"]) for v, rs in runs.items()}
            summary[f"{model}/{mode}"] = dict(s, runs=runs)
            first = runs[variants[0]][0]
            timing = (f"{args.rounds} interleaved round(s) in one process" if interleaved else
                      f"{args.rounds} round(s) x {args.steps} timed steps in each variant's process")
            print(f"\n{model}, batch {first['batch_size']}, {first['side']}x{first['side']}, {args.device} {mode}, "
                  f"{first['threads']} threads, torch {first['torch']}, time: median of {timing}\n")
            print("| variant | step (s) | vs naive | CPU time (s) | vs naive | peak step memory (MiB) | vs naive "
                  "| vs checkpointed | first-step RSS (MiB) |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

            def ratio(v, key, base, s=s):
                return s[v][key] / s[base][key] if base in s and s[base][key] else None

            for v in s:
                def x(c):
                    return "-" if c is None else f"{c:.2f}x"

                cpu_s = "-" if s[v]["cpu_s"] is None else f"{s[v]['cpu_s']:.3f}"
                cpu_ratio = ratio(v, "cpu_s", "naive") if s[v]["cpu_s"] is not None else None
                print(f"| {v} | {s[v]['step_s']:.3f} | {x(ratio(v, 'step_s', 'naive'))} | {cpu_s} | {x(cpu_ratio)} "
                      f"| {_mib(s[v]['peak_bytes'])} | {x(ratio(v, 'peak_bytes', 'naive'))} "
                      f"| {x(ratio(v, 'peak_bytes', 'checkpointed'))} "
                      f"| {_mib(s[v]['rss_first_step_bytes']) if not gpu else '-'} |")
            if "ours" in s and "naive" in s and (gpu or "checkpointed" in s):
                if gpu:
                    checks = [("peak / naive", ratio("ours", "peak_bytes", "naive"), 0.35),
                              ("step time / naive", ratio("ours", "step_s", "naive"), 1.10)]
                    binding = mode != "fp32"
                else:
                    # On a shared CPU the process's CPU time is the robust measure of a step's work (wall time
                    # includes waiting for the other jobs); with --threads 1 it is the single-core step time.
                    key = "cpu_s" if s["ours"]["cpu_s"] is not None else "step_s"
                    checks = [("peak / checkpointed", ratio("ours", "peak_bytes", "checkpointed"), 0.7),
                              (f"step {'CPU ' if key == 'cpu_s' else ''}time / naive", ratio("ours", key, "naive"),
                               1.0)]
                    binding = True
                print()
                for name, value, target in checks:
                    met = value <= target
                    ok &= met or not binding
                    print(f"{'MET' if met else 'MISSED'}: {model} {mode} ours {name} = {value:.3f} (target <= "
                          f"{target}){'' if binding else ' (for the record)'}")
                if not s["ours"]["kernel_compiled"]:
                    print("WARNING: 'ours' ran on the PyTorch fallback (lightcnn._C not built for this device)")
                    ok = False
            print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), summary=summary), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
