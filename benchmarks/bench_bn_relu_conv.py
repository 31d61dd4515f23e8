"""Benchmark of the fused pre-activation BN-ReLU-Conv kernel: one WRN-28-10 training step (CIFAR, 32x32,
SGD with Nesterov momentum and weight decay) on

  kernel      every BN-ReLU-conv unit on torch.ops.lightcnn.bn_relu_conv2d
  reference   the unfused nn.BatchNorm2d -> nn.ReLU -> nn.Conv2d sequence
  compiled    the reference under torch.compile (inductor)

Each variant runs in a fresh subprocess (so that one's allocations cannot hide another's peak), and the
variants alternate over --rounds rounds; the table reports the median step time over all timed steps.
Memory, per variant:
  saved       bytes of the distinct activation storages autograd saves for the backward during one
              training forward (torch.autograd.graph.saved_tensors_hooks; parameters excluded). Eager only:
              a compiled graph saves its tensors inside the compiled function.
  peak        the most memory allocated at once during one training step above what was allocated before
              it (model, gradients kept allocated by zero_grad(set_to_none=False), optimiser state, data).
              CPU: the running sum of the allocation events the profiler records
              (torch.profiler, profile_memory=True); CUDA: torch.cuda.max_memory_allocated().
  rss         CPU only, for the record: the process's peak resident set size during its first step minus
              the resident size before it (fresh process; includes the gradients, the momentum buffers
              and, for `compiled`, the compiler's own memory).
Precision (--precision): fp32 (TF32 off), tf32 (float32 with cuDNN/cuBLAS TF32 on, PyTorch's cuDNN
default), bf16 (torch.autocast bfloat16; use with --channels-last, as users run it).
Targets, kernel / reference: CUDA bf16 and tf32: time <= 1.10 and peak memory <= 0.60; CUDA
fp32 without TF32: time <= 1.05; CPU: time <= 1.05 and memory <= 0.7.

  python benchmarks/bench_bn_relu_conv.py                                  # CPU, batch 8
  python benchmarks/bench_bn_relu_conv.py --device cuda --batch-size 128   # GPU
  python benchmarks/bench_bn_relu_conv.py --json results.json              # also write the figures
  python benchmarks/bench_bn_relu_conv.py --device cuda --fit-memory-gib 16 --variants kernel,reference

--fit-memory-gib G: instead of timing, the largest batch whose training step fits in G GiB, per variant
(the fused unit should fit a larger batch than the reference). Each worker measures the whole
memory of a step (model, gradients, optimiser state, data and the step's peak: CUDA max_memory_allocated;
CPU 3x the parameters plus the profiler's step peak) at --batch-size and twice that, fits
memory = fixed + per_sample * batch, and on CUDA confirms the predicted batch under
torch.cuda.set_per_process_memory_fraction(G GiB), stepping down 3% at a time on an out-of-memory error.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("kernel", "reference", "compiled")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _peak_allocated_cpu(fn) -> int:
    """Peak of (allocated - freed) bytes while fn() runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def fit_batch(args, torch, device, model, batch, step, sync) -> dict:
    """The largest batch whose whole training step fits in args.fit_memory_gib GiB (see the module docstring)."""
    cap = int(args.fit_memory_gib * 2**30)
    state = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads, momentum

    def whole_step_bytes(n):
        x, y = batch(n)
        step(x, y)  # warm: optimiser state, cuDNN algorithms
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step(x, y)
            sync()
            return torch.cuda.max_memory_allocated(device)
        return state + x.nbytes + y.nbytes + _peak_allocated_cpu(lambda: step(x, y))

    b1, b2 = args.batch_size, 2 * args.batch_size
    m1, m2 = whole_step_bytes(b1), whole_step_bytes(b2)
    per_sample = (m2 - m1) / (b2 - b1)
    fixed = m1 - per_sample * b1
    best = max(1, int((cap - fixed) / per_sample))
    confirmed = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
        for _ in range(20):
            try:
                x, y = batch(best)
                step(x, y)
                step(x, y)
                sync()
                confirmed = best
                break
            except torch.cuda.OutOfMemoryError:
                x = y = None
                torch.cuda.empty_cache()
                best = max(1, int(best * 0.97))
    return dict(variant=args.variant, model=args.model, device=str(device), precision=args.precision,
                drop_rate=args.drop_rate, channels_last=args.channels_last, fit_memory_gib=args.fit_memory_gib,
                fixed_bytes=fixed, per_sample_bytes=per_sample, fit_batch=best, confirmed=confirmed,
                measured={b1: m1, b2: m2}, torch=torch.__version__)


def fit_main(args, variants) -> int:
    results = {v: run_variant(args, v) for v in variants}
    print(f"\n{args.model}, 32x32, {args.device} {args.precision}, drop_rate {args.drop_rate}"
          f"{' channels-last' if args.channels_last else ''}: the largest batch whose training step fits in "
          f"{args.fit_memory_gib:g} GiB\n")
    print("| variant | fixed (MiB) | per sample (MiB) | largest batch | confirmed on the device |")
    print("|---|---:|---:|---:|---|")
    for v, r in results.items():
        conf = "-" if args.device == "cpu" else ("yes" if r["confirmed"] else "no (out of memory at every try)")
        print(f"| {v} | {_mib(r['fixed_bytes'])} | {r['per_sample_bytes'] / 2**20:.2f} | {r['fit_batch']} | {conf} |")
    ok = True
    if {"kernel", "reference"} <= results.keys():
        k, ref = results["kernel"]["fit_batch"], results["reference"]["fit_batch"]
        ok = k > ref
        label = (f"{args.model} {args.device} {args.precision}" + (" channels-last" if args.channels_last else "")
                 + f" drop {args.drop_rate} in {args.fit_memory_gib:g} GiB")
        print(f"\n{'MET' if ok else 'MISSED'}: {label}: largest batch kernel / reference = {k / ref:.2f} "
              f"({k} vs {ref}; target > 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    return 0 if ok else 1


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from lightcnn.models import create
    from lightcnn.ops import backend_info

    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    impl = "kernel" if args.variant == "kernel" else "reference"
    model = create(args.model, impl=impl, drop_rate=args.drop_rate).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, model.num_classes, (n,), generator=gen).to(device)

    x, y = batch(args.batch_size)
    net = torch.compile(model) if args.variant == "compiled" else model

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(x=x, y=y):
        with autocast:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: model state, not step memory
        loss.backward()
        opt.step()
        return loss

    if args.fit_memory_gib:
        return fit_batch(args, torch, device, model, batch, step, sync)

    result = dict(variant=args.variant, model=args.model, device=str(device), batch_size=args.batch_size,
                  precision=args.precision, drop_rate=args.drop_rate, channels_last=args.channels_last,
                  threads=torch.get_num_threads(), torch=torch.__version__,
                  kernel_compiled=backend_info()["ops"].get("bn_relu_conv2d", {}).get(device.type, False))
    rss_before = _rss_bytes()
    rss_reset = _reset_peak_rss()
    t0 = time.perf_counter()
    for i in range(max(args.warmup, 1)):
        step()
        if i == 0 and device.type == "cpu" and rss_reset:
            result["rss_first_step_bytes"] = _peak_rss_bytes() - rss_before
    sync()
    result["warmup_s"] = time.perf_counter() - t0

    if args.variant != "compiled":
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params and s.nbytes() > 0:
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = F.cross_entropy(net(x), y)
        del loss
        result["saved_bytes"] = sum(storages.values())

    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        result["peak_bytes"] = _peak_allocated_cpu(step)
        result["peak_measure"] = "profiler memory events: peak of allocated - freed during one step"
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        result["peak_measure"] = "torch.cuda.max_memory_allocated - allocated before the timed steps"
    result["step_times_s"] = times
    return result


def run_variant(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--device", args.device,
           "--model", args.model, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--drop-rate", str(args.drop_rate), "--threads", str(args.threads),
           "--precision", args.precision]
    if args.channels_last:
        cmd.append("--channels-last")
    if args.fit_memory_gib:
        cmd += ["--fit-memory-gib", str(args.fit_memory_gib)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default="wrn28_10", help="any registered pre-activation model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=1, help="runs per variant, alternating between variants")
    p.add_argument("--drop-rate", type=float, default=0.0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                   help="fp32: TF32 off; tf32: TF32 on; bf16: autocast bfloat16")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--json", help="write all results to this file")
    p.add_argument("--fit-memory-gib", type=float, default=0,
                   help="instead of timing: the largest batch whose step fits in this many GiB, per variant")
    p.add_argument("--worker", choices=VARIANTS, dest="variant", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(worker(args)))
        return 0

    variants = [v for v in args.variants.split(",") if v]
    if args.fit_memory_gib:
        return fit_main(args, variants)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            runs[v].append(run_variant(args, v))
            print(f"round {r + 1}/{args.rounds} {v}: steps {['%.3f' % t for t in runs[v][-1]['step_times_s']]} s",
                  file=sys.stderr)

    summary = {}
    for v, rs in runs.items():
        times = [t for r in rs for t in r["step_times_s"]]
        saved = [r["saved_bytes"] for r in rs if "saved_bytes" in r]
        summary[v] = dict(step_s=statistics.median(times), saved_bytes=saved[0] if saved else None,
                          peak_bytes=statistics.median(r["peak_bytes"] for r in rs), warmup_s=rs[0]["warmup_s"],
                          rss_first_step_bytes=rs[0].get("rss_first_step_bytes"),
                          kernel_compiled=rs[0]["kernel_compiled"])
    first = runs[variants[0]][0]
    print(f"\n{args.model}, batch {args.batch_size}, 32x32, {args.device} {args.precision}, drop_rate {args.drop_rate}"
          f"{' channels-last' if args.channels_last else ''}, {first['threads']} threads, torch {first['torch']}, "
          f"{args.rounds} round(s) x {args.steps} timed steps (median)\n")
    print("| variant | step (s) | vs reference | saved activations (MiB) | vs reference | peak step memory (MiB) "
          "| vs reference | first-step RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = summary.get("reference")
    for v, s in summary.items():
        def ratio(key):
            return "-" if not ref or s[key] is None or not ref[key] else f"{s[key] / ref[key]:.2f}x"
        print(f"| {v} | {s['step_s']:.3f} | {ratio('step_s')} | {_mib(s['saved_bytes'])} | {ratio('saved_bytes')} "
              f"| {_mib(s['peak_bytes'])} | {ratio('peak_bytes')} | {_mib(s['rss_first_step_bytes'])} |")
    ok = True
    if ref and "kernel" in summary:
        k = summary["kernel"]
        label = f"{args.model} b{args.batch_size} {args.device} {args.precision}" + (
            " channels-last" if args.channels_last else "") + f" drop {args.drop_rate}"
        if args.device == "cpu":
            checks = [("saved activations", k["saved_bytes"] / ref["saved_bytes"], 0.7),
                      ("peak step memory", k["peak_bytes"] / ref["peak_bytes"], 0.7),
                      ("step time", k["step_s"] / ref["step_s"], 1.05)]
        elif args.precision == "fp32":
            checks = [("step time", k["step_s"] / ref["step_s"], 1.05)]
        else:
            checks = [("step time", k["step_s"] / ref["step_s"], 1.10),
                      ("peak step memory", k["peak_bytes"] / ref["peak_bytes"], 0.60)]
        print()
        targets = []
        for name, value, target in checks:
            status = "MET" if value <= target else "MISSED"
            ok &= value <= target
            targets.append(dict(target=f"{label}: kernel / reference {name} <= {target}", value=value, status=status))
            print(f"{status}: {label}: kernel / reference {name} = {value:.3f} (target <= {target})")
        summary["targets"] = targets
        if not k["kernel_compiled"]:
            print("WARNING: the kernel variant ran on the PyTorch fallback (lightcnn._C not built for this device)")
            ok = False
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), summary=summary, runs=runs), f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
