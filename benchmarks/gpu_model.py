"""GPU performance model of lightcnn's CUDA kernels: PREDICTIONS from the CPU emulator, not measurements.

Runs each op's CUDA code path (torch.ops.lightcnn_emu.*, tests/cuda_emu) on representative shapes, forward
and backward in training mode, with the emulator's access recorder on, and reports per op call and per
kernel:
  - coalescing: bytes the lanes of a warp asked for / bytes of the 32-byte sectors the request touched, per
    global access instruction and overall (a request asking for more than it touches, e.g. every lane
    reading the same value, counts as 100%);
  - DRAM traffic: the distinct sectors each launch reads and writes (x 32 B), against the op's compulsory
    traffic (each tensor its design must read or write, once per pass) and the reference's (the unfused
    ATen/cuDNN sequence, from its passes); the convolution is the same in both and is left out;
  - launches per call, and for every launch moving more than 1 MB at the full-size shape, its blocks against
    the 132 SMs of an H100 (waves = blocks / 132), from the host logic (gpu_model.launch_plan, which the CI
    test checks against the emulator's launches);
  - a predicted time of the memory-bound part: traffic / bandwidth (H100 3.35 TB/s, H200 4.8 TB/s) plus
    LAUNCH_US per launch, beside the reference's.
The model cannot see latency, occupancy or instruction throughput: a GPU run (benchmarks/gpu_check.sh) says
how far off it is (the measured / predicted ratio per kernel goes to benchmarks/RESULTS.md).

    python benchmarks/gpu_model.py                  # every case (50 minutes on 2 busy cores)
    python benchmarks/gpu_model.py --quick          # the CI-sized shapes (seconds)
    python benchmarks/gpu_model.py --json benchmarks/gpu_model.json   # also write the predictions
    python benchmarks/gpu_model.py --measure --predictions benchmarks/gpu_model.json   # on a GPU: measured
                                                    # beside predicted, per case (gpu_check.sh runs this)

The last line: `gpu_model: kernels=N coalescing_min=X traffic_vs_compulsory_max=Y waves_min=Z launches_max=L`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SMS = 132  # H100 SXM / H200
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, DRAM
LAUNCH_US = 3.0  # per launch: launch and ramp-up/tail of a short kernel
BIG_LAUNCH = 1 << 20  # bytes: the launches whose waves are held
# the targets (tests/test_gpu_model.py holds them on small shapes)
COALESCING_PER_INSTR, COALESCING_OVERALL, TRAFFIC_MAX, WAVES_MIN = 0.80, 0.90, 1.25, 2.0
# Hot: the instructions of the activation kernels that serve at least HOT_SECTORS of the bytes the lanes of
# their launch's busiest instruction asked for (useful bytes: not a block's one-off write of its partial sum,
# whose sector, at the emulator's small shapes, can weigh as much as a whole row of the activation's).
HOT_SECTORS = 0.10

# Kernels whose traffic grows with the batch (the others work on per-channel vectors).
ACTIVATION_KERNELS = {
    "lrn_forward_kernel", "lrn_forward_cl_kernel", "lrn_backward_kernel", "lrn_backward_cl_kernel",
    "lrn_backward_t_kernel", "lrn_backward_grad_kernel", "partial_nchw_kernel", "partial_nhwc_kernel",
    "bn_relu_kernel", "grad_input_kernel", "relu_mask_kernel", "bn_relu_into_kernel", "grad_inputs_kernel",
    "reduce_from_kernel", "stats_from_kernel"}


# ------------------------------------------------------------------ cases

@dataclass
class Case:
    op: str          # "bn_relu_conv" | "dense" | "lrn"
    net: str
    shape: tuple     # full size (N, C, H, W); dense: (N, C_total, H, W) with `features`
    features: tuple = ()  # dense: channels of each feature
    small_batch: int = 2
    hw: tuple | None = None  # recorded spatial size (default: recorded_hw of the true one)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        N, C, H, W = self.shape
        f = f" {len(self.features)} features" if self.features else ""
        return f"{self.net} {C}x{H}x{W}{f}"


def recorded_hw(H: int, W: int) -> tuple[int, int]:
    """The spatial size the emulator runs for an (H, W) layer: the smallest h x w of at least MIN_AREA values
    (2 <= h <= w, squarest first) whose h*w has the same residue mod 8, or (H, W) itself when none is smaller.
    Besides C (always the true one), that residue is all the kernels' access pattern depends on (16-byte
    vectors of 4 or 8 elements along H*W); waves and times use the true H, W."""
    for area in range(MIN_AREA, H * W):
        if (area - H * W) % 8 == 0:
            for h in range(math.isqrt(area), 1, -1):
                if area % h == 0:
                    return h, area // h
    return H, W


# A channel's row (NCHW) at least a sector long in bf16, as in every real layer (>= 7 x 7): a shorter one would
# make the reductions' row-by-row reads look uncoalesced.
MIN_AREA = 16


def dense_layer(net, N, first, k, layer, H):
    feats = (first,) + (k,) * (layer - 1)
    return Case("dense", net, (N, sum(feats), H, H), feats)


CASES = [
    Case("bn_relu_conv", "WRN-28-10", (128, 160, 32, 32)),
    Case("bn_relu_conv", "WRN-28-10", (128, 320, 16, 16)),
    Case("bn_relu_conv", "WRN-28-10", (128, 640, 8, 8)),
    Case("bn_relu_conv", "PreAct-164", (128, 64, 32, 32)),
    Case("bn_relu_conv", "PreAct-164", (128, 16, 32, 32)),
    Case("bn_relu_conv", "PreAct-164", (128, 256, 8, 8)),
    Case("bn_relu_conv", "DenseNet-121 3x3", (64, 128, 56, 56)),
    dense_layer("DenseNet-121", 64, 64, 32, 6, 56),
    dense_layer("DenseNet-121", 64, 128, 32, 12, 28),
    dense_layer("DenseNet-121", 64, 256, 32, 24, 14),
    dense_layer("DenseNet-121", 64, 512, 32, 16, 7),
    Case("lrn", "AlexNet/ZFNet", (128, 96, 55, 55)),
    Case("lrn", "AlexNet", (128, 256, 27, 27)),
    Case("lrn", "GoogLeNet", (128, 64, 56, 56)),
    Case("lrn", "GoogLeNet", (128, 192, 56, 56)),
]
# CI-sized: the true channel counts of a few layers, small spatial sizes (the access pattern depends on C,
# on H*W only through its divisibility by the vector width, which these keep)
QUICK_CASES = [
    Case("bn_relu_conv", "WRN-28-10", (128, 160, 32, 32), small_batch=2, hw=(4, 4)),
    Case("bn_relu_conv", "PreAct-164", (128, 16, 32, 32), small_batch=2, hw=(4, 4)),
    Case("bn_relu_conv", "odd", (2, 6, 5, 3), small_batch=2),  # every path's remainder (no full size)
    Case("dense", "DenseNet-121", (64, 128, 56, 56), (64, 32, 32), small_batch=2, hw=(4, 4)),
    Case("lrn", "AlexNet", (128, 96, 55, 55), small_batch=2, hw=(3, 3)),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("NCHW", "NHWC")


def elem_size(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ the host logic, mirrored (full-size grids)

def _bn_partial_grid(N, C, S, channels_last):
    M = N * S
    if channels_last:
        tx = 1
        while tx < 32 and tx < C:
            tx *= 2
        ty = 256 // tx
        splits = min(max(M // (ty * 16), 1), 1024)
        return (-(-C // tx)) * splits
    return C * min(max(M // 4096, 1), 1024)


def _bn_elementwise_grid(N, C, S, channels_last, esize):
    numel = N * C * S
    V = 16 // esize
    if not (numel % V == 0 and (C if channels_last else S) % V == 0):
        V = 1
    return max(1, min(-(-(numel // V) // 256), 1 << 16))


def _dense_chunks(features):
    return [features[i:i + 64] for i in range(0, len(features), 64)]


def launch_plan(case: Case, dtype, channels_last: bool, N: int | None = None, hw: tuple | None = None) -> dict:
    """Blocks of each activation kernel's launches (kernel name -> list of grid sizes, in order) for the
    shape at batch N (default: the full one), from the host code's formulas (bn_relu_conv_cuda.cu,
    dense_cuda.cu). LRN's come from the emulator itself (launches without running the kernels)."""
    N = N or case.shape[0]
    H, W = hw or case.shape[2:]
    C, S, es = case.shape[1], H * W, elem_size(dtype)
    plan: dict[str, list[int]] = {}

    def add(name, blocks):
        plan.setdefault(name, []).append(blocks)

    if case.op == "bn_relu_conv":
        part = "partial_nhwc_kernel" if channels_last and C > 1 and S > 1 else "partial_nchw_kernel"
        elem = _bn_elementwise_grid(N, C, S, channels_last and C > 1 and S > 1, es)
        add(part, _bn_partial_grid(N, C, S, channels_last and C > 1 and S > 1))  # forward statistics
        add("bn_relu_kernel", elem)
        add("bn_relu_kernel", elem)  # backward: recomputed
        add(part, _bn_partial_grid(N, C, S, channels_last and C > 1 and S > 1))  # backward sums
        add("grad_input_kernel", elem)
    elif case.op == "dense":
        M = N * S
        for name in ("stats_from_kernel", "bn_relu_into_kernel", "bn_relu_into_kernel", "reduce_from_kernel",
                     "grad_inputs_kernel"):
            for chunk in _dense_chunks(case.features):
                max_k = max(chunk)
                if name in ("stats_from_kernel", "reduce_from_kernel") and channels_last:
                    # lanes along a pixel's channels: one block per (feature, group of up to 32 channels) and split
                    groups = sum(-(-k // min(32, 1 << max(0, (k - 1).bit_length()))) for k in chunk)
                    add(name, groups * max(1, min(-(-1056 // groups), max(1, min(M // 128, 65535)))))
                elif name in ("stats_from_kernel", "reduce_from_kernel"):
                    splits = max(1, min(64, M // (256 * 16)))
                    add(name, max_k * splits * len(chunk))
                else:
                    add(name, max(1, min(-(-(N * max_k * S) // 256), 4096)) * len(chunk))
    return plan


# ------------------------------------------------------------------ compulsory and reference traffic

def passes(case: Case) -> tuple[float, float, int]:
    """(compulsory, reference) traffic in activation-sized tensors per forward + backward call, and the
    reference's launches. The BN part only: the convolution reads the same input in both.
    Fused BN-ReLU-Conv / DenseNet op: forward statistics (read x), BN-ReLU into the conv input (read x,
    write y); backward: y recomputed (read x, write y), sums (read x, dy), gradient (read x, dy, write dx):
    10. The unfused reference: [DenseNet: cat (read, write): 2] BN forward (statistics, then normalise:
    read x twice, write), ReLU in place (read, write); backward: ReLU (read dy, y, write), BN backward
    (sums: read x, dy; gradient: read x, dy, write dx): 3 + 2 + 3 + 5 = 13 (+2); launches: BN 2, ReLU 1,
    ReLU backward 1, BN backward 2 (+ cat 1).
    LRN: the kernels read x, write y; backward read x, dy, write dx: 5. The reference F.local_response_norm
    forward: x*x, pad, avg_pool3d, mul, add, pow, div (2 + 2 + 2 + 2 + 2 + 2 + 3 = 15 passes), and its
    autograd backward about twice that (the reference's measured step: 7x the kernel's, benchmarks/RESULTS.md)."""
    if case.op == "lrn":
        return 5.0, 45.0, 21
    if case.op == "dense":
        return 10.0, 15.0, 7
    return 10.0, 13.0, 6


# ------------------------------------------------------------------ recording

_emu = None


def emulator():
    global _emu
    if _emu is None:
        from tests.cuda_emu.build import build

        build()  # the cached build (tests/cuda_emu/build.py)
        _emu = torch.ops.lightcnn_emu
    return _emu


def _layout(t, channels_last):
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t.contiguous()


def run_case(case: Case, dtype, channels_last: bool, N: int | None = None, hw=None, execute=True) -> list[dict]:
    """The launches (recorder.cu's JSON) of one forward + backward op call in training mode."""
    E = emulator()
    N = N or case.small_batch
    H, W = hw or case.hw or recorded_hw(*case.shape[2:])
    C = case.shape[1]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return _layout(torch.randn(*shape, generator=gen).to(dtype), channels_last and len(shape) == 4)

    E.emu_profile_begin(execute)
    try:
        if case.op == "bn_relu_conv":
            x, w, b, cw = rnd(N, C, H, W), torch.rand(C) + 0.5, torch.randn(C), rnd(8, C, 1, 1)
            args = [x, w, b, None, None, cw, None, [1, 1], [0, 0], [1, 1], 1, True, 1e-5, None, 0.0]
            out, mean, var = E.bn_relu_conv2d(*args)
            g = _layout(torch.randn(out.shape, generator=gen).to(dtype), channels_last)
            E.bn_relu_conv2d_backward(g, x, w, b, mean, var, cw, *args[7:13], False, None, 0.0)
        elif case.op == "dense":
            feats = [rnd(N, k, H, W) for k in case.features]
            w, b, cw = torch.rand(C) + 0.5, torch.randn(C), rnd(8, C, 1, 1)
            out, mean, var = E.dense_bn_relu_conv2d(feats, w, b, None, None, cw, [0, 0], True, 1e-5)
            g = _layout(torch.randn(out.shape, generator=gen).to(dtype), channels_last)
            E.dense_bn_relu_conv2d_backward(g, feats, w, b, mean, var, cw, [0, 0], True, 1e-5)
        else:
            x = rnd(N, C, H, W)
            E.lrn(x, 5, 1e-4, 0.75, 2.0)
            E.lrn_backward(_layout(torch.randn(x.shape, generator=gen).to(dtype), channels_last), x, 5, 1e-4, 0.75,
                           2.0)
    finally:
        rec = json.loads(E.emu_profile_end())
    return rec


# ------------------------------------------------------------------ analysis

def blocks(launch) -> int:
    return math.prod(launch["grid"])


def analyse(case: Case, dtype_name: str, layout: str, rec: list[dict], full_plan: dict, N_small: int, hw) -> dict:
    dtype = DTYPES[dtype_name]
    es = elem_size(dtype)
    N, C, H, W = case.shape
    h, w = hw or case.hw or recorded_hw(H, W)
    act_small = N_small * C * h * w * es
    act_full = N * C * H * W * es
    compulsory, reference, ref_launches = passes(case)
    traffic = [ln["dram_read"] + ln["dram_written"] for ln in rec]
    instrs, hot_instrs = [], []
    req = useful = sect = 0
    for ln in rec:
        hot_launch = ln["name"] in ACTIVATION_KERNELS
        most = max((i["useful"] for i in ln["instrs"] if i["space"] == "global"), default=0)
        for i in ln["instrs"]:
            if i["space"] != "global" or i["sector_bytes"] == 0:
                continue
            eff = i["useful"] / i["sector_bytes"]
            row = dict(kernel=ln["name"], op=i["op"], size=i["size"], requests=i["requests"], coalescing=eff,
                       sector_bytes=i["sector_bytes"],
                       hot=hot_launch and i["useful"] >= HOT_SECTORS * most)
            instrs.append(row)
            if row["hot"]:
                hot_instrs.append(row)
                useful += i["useful"]
                sect += i["sector_bytes"]
            req += i["requested"]
    shared = [(ln["name"], i["op"], i["wavefronts"] / max(i["ideal_wavefronts"], 1))
              for ln in rec for i in ln["instrs"] if i["space"] == "shared" and i["ideal_wavefronts"]]
    # traffic of the activation kernels at the small shape, in activation-sized tensors (the per-channel
    # launches move C-sized vectors: a fixed few KB that the small shape would inflate); the time adds theirs
    act_traffic = sum(t for ln, t in zip(rec, traffic) if ln["name"] in ACTIVATION_KERNELS)
    ratio_act = act_traffic / act_small
    traffic_full = ratio_act * act_full + (sum(traffic) - act_traffic)
    # waves of the full-size launches moving > 1 MB (the activation kernels; per-channel ones are C-sized)
    waves = []
    if full_plan:
        seen: dict[str, int] = {}
        for ln, t in zip(rec, traffic):
            name = ln["name"]
            if name not in full_plan:
                continue
            k = seen.get(name, 0)
            seen[name] = k + 1
            grid = full_plan[name][min(k, len(full_plan[name]) - 1)]
            moved = t * act_full / act_small
            if moved > BIG_LAUNCH:
                waves.append(dict(kernel=name, blocks=grid, waves=grid / SMS, mbytes=moved / 2**20))
    launches = len(rec)
    pred = {gpu: traffic_full / bw * 1e6 + launches * LAUNCH_US for gpu, bw in BANDWIDTH.items()}
    ref_pred = {gpu: reference * act_full / bw * 1e6 + ref_launches * LAUNCH_US for gpu, bw in BANDWIDTH.items()}
    mergeable = mergeable_launches(rec)
    return dict(case=case.name, op=case.op, dtype=dtype_name, layout=layout, launches=launches,
                coalescing_overall=useful / sect if sect else 1.0,
                coalescing_min=min((r["coalescing"] for r in hot_instrs), default=1.0),
                worst=min(hot_instrs, key=lambda r: r["coalescing"], default=None),
                traffic_vs_compulsory=ratio_act / compulsory, traffic_vs_reference=ratio_act / reference,
                waves=waves, waves_min=min((x["waves"] for x in waves), default=math.inf),
                predicted_us=pred, reference_us=ref_pred, mergeable=mergeable,
                bank_conflict_max=max((s[2] for s in shared), default=1.0), instrs=instrs)


def mergeable_launches(rec: list[dict]) -> list[str]:
    """Neighbouring launches whose work could be one: two in a row that both move only per-channel vectors
    (no activation kernel), e.g. a reduction's finishing pass followed by the per-channel affine step."""
    out = []
    for a, b in zip(rec, rec[1:]):
        if a["name"] not in ACTIVATION_KERNELS and b["name"] not in ACTIVATION_KERNELS:
            out.append(f"{a['name']} + {b['name']}")
    return out


def lrn_full_plan(case, dtype, channels_last) -> dict:
    """LRN's full-size grids: the emulator's launches of the full shape, not run (host logic only)."""
    rec = run_case(case, dtype, channels_last, N=case.shape[0], hw=case.shape[2:], execute=False)
    plan: dict[str, list[int]] = {}
    for ln in rec:
        plan.setdefault(ln["name"], []).append(blocks(ln))
    return plan


def model(cases, dtypes=("fp32", "bf16"), layouts=LAYOUTS, log=print) -> list[dict]:
    rows = []
    for case in cases:
        for dn in dtypes:
            for lay in layouts:
                cl = lay == "NHWC"
                t0 = time.time()
                rec = run_case(case, DTYPES[dn], cl)
                if case.op == "lrn":
                    plan = lrn_full_plan(case, DTYPES[dn], cl)
                else:
                    plan = launch_plan(case, DTYPES[dn], cl)
                row = analyse(case, dn, lay, rec, plan, case.small_batch, case.hw)
                row["launch_blocks"] = [(ln["name"], blocks(ln)) for ln in rec]
                row["emulated_s"] = round(time.time() - t0, 1)
                rows.append(row)
                log(format_row(row))
    return rows


def format_row(r) -> str:
    worst = r["worst"]
    w = f" (worst {worst['kernel']} {worst['op']} {worst['size']} B)" if worst else ""
    waves = " ".join(f"{x['kernel'].removesuffix('_kernel')}={x['waves']:.1f}" for x in r["waves"])
    p, q = r["predicted_us"], r["reference_us"]
    lines = [
        f"{r['case']} {r['dtype']} {r['layout']}: launches {r['launches']}, coalescing hot min "
        f"{r['coalescing_min']:.0%}{w} overall {r['coalescing_overall']:.0%}, "
        f"traffic {r['traffic_vs_compulsory']:.2f}x compulsory {r['traffic_vs_reference']:.2f}x reference, "
        f"shared-memory wavefronts max {r['bank_conflict_max']:.2f}x ideal",
        f"    waves (launches > 1 MB at full size): {waves or '-'}",
        f"    predicted memory-bound time (PREDICTION): H100 {p['H100']:.0f} us (reference {q['H100']:.0f}), "
        f"H200 {p['H200']:.0f} us (reference {q['H200']:.0f})",
    ]
    if r["mergeable"]:
        lines.append(f"    mergeable neighbour launches: {', '.join(sorted(set(r['mergeable'])))}")
    return "\n".join(lines)


def summary(rows) -> str:
    kernels = {i["kernel"] for r in rows for i in r["instrs"]}
    return (f"gpu_model: kernels={len(kernels)} coalescing_min={min(r['coalescing_min'] for r in rows):.2f} "
            f"traffic_vs_compulsory_max={max(r['traffic_vs_compulsory'] for r in rows):.2f} "
            f"waves_min={min(r['waves_min'] for r in rows):.1f} launches_max={max(r['launches'] for r in rows)}")


def per_kernel(rows) -> dict:
    """Per kernel: the lowest coalescing of its hot instructions over every case."""
    out: dict[str, float] = {}
    for r in rows:
        for i in r["instrs"]:
            if i["hot"]:
                out[i["kernel"]] = min(out.get(i["kernel"], 1.0), i["coalescing"])
    return out


# ------------------------------------------------------------------ measuring on a GPU (gpu_check.sh)

def measure(predictions: Path, rounds: int = 20) -> None:
    """Times each case's op call (forward + backward) on the GPU, minus its convolution's, beside the model."""
    import torch.nn.functional as F

    from lightcnn.ops import bn_relu_conv2d, dense_bn_relu_conv2d, local_response_norm

    rows = json.loads(predictions.read_text())
    dev = torch.device("cuda")

    def timed(fn):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(rounds):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / rounds  # us

    by_name = {c.name: c for c in CASES}
    for r in rows:
        case = by_name.get(r["case"])
        if case is None:
            continue
        N, C, H, W = case.shape
        dtype, cl = DTYPES[r["dtype"]], r["layout"] == "NHWC"
        mf = torch.channels_last if cl else torch.contiguous_format
        if case.op == "lrn":
            x = torch.randn(N, C, H, W, device=dev, dtype=dtype).contiguous(memory_format=mf).requires_grad_()

            def fused():
                local_response_norm(x, 5, 1e-4, 0.75, 2.0).sum().backward()

            def ref():
                F.local_response_norm(x, 5, 1e-4, 0.75, 2.0).sum().backward()

            conv = None
        else:
            feats = [torch.randn(N, k, H, W, device=dev, dtype=dtype).contiguous(memory_format=mf).requires_grad_()
                     for k in (case.features or (C,))]
            w = torch.ones(C, device=dev, requires_grad=True)
            b = torch.zeros(C, device=dev, requires_grad=True)
            cw = torch.randn(128, C, 1, 1, device=dev, dtype=dtype, requires_grad=True)

            def fused():
                if case.op == "dense":
                    out = dense_bn_relu_conv2d(feats, None, None, w, b, cw, padding=0, training=True)
                else:
                    out = bn_relu_conv2d(feats[0], None, None, w, b, cw, training=True)
                out.sum().backward()

            def ref():
                x = torch.cat(feats, 1) if case.op == "dense" else feats[0]
                F.conv2d(torch.relu(F.batch_norm(x, None, None, w, b, True)), cw).sum().backward()

            y = torch.randn(N, C, H, W, device=dev, dtype=dtype).contiguous(memory_format=mf).requires_grad_()

            def conv():
                F.conv2d(y, cw).sum().backward()
        t_conv = timed(conv) if conv else 0.0
        t_f, t_r = timed(fused) - t_conv, timed(ref) - t_conv
        gpu = "H200" if "H200" in torch.cuda.get_device_name() else "H100"
        p, q = r["predicted_us"][gpu], r["reference_us"][gpu]
        print(f"{r['case']} {r['dtype']} {r['layout']} ({gpu}): kernel measured {t_f:.0f} us vs predicted {p:.0f} us "
              f"(ratio {t_f / p:.2f}); reference measured {t_r:.0f} us vs predicted {q:.0f} us (ratio {t_r / q:.2f})"
              + ("" if conv is None else f"; the convolution alone {t_conv:.0f} us, subtracted"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI-sized cases only")
    ap.add_argument("--op", choices=["bn_relu_conv", "dense", "lrn"], action="append", help="only these ops")
    ap.add_argument("--cases", help="only the cases whose name contains one of these comma-separated words")
    ap.add_argument("--json", type=Path, help="write the rows (the predictions) here")
    ap.add_argument("--measure", action="store_true", help="on a GPU: time each case beside its prediction")
    ap.add_argument("--predictions", type=Path, default=ROOT / "benchmarks" / "gpu_model.json")
    args = ap.parse_args(argv)
    if args.measure:
        if not torch.cuda.is_available():
            print("gpu_model.py --measure needs a CUDA device; without one run the model (no --measure)")
            return 2
        if not args.predictions.exists():
            print(f"gpu_model.py --measure: no predictions at {args.predictions}; run `python benchmarks/gpu_model.py "
                  f"--json {args.predictions}` first (on any machine with g++)")
            return 2
        measure(args.predictions)
        return 0
    cases = QUICK_CASES if args.quick else CASES
    if args.op:
        cases = [c for c in cases if c.op in args.op]
    if args.cases:
        cases = [c for c in cases if any(w in c.name for w in args.cases.split(","))]
    print("GPU model of the CUDA kernels: PREDICTIONS from the emulator (no GPU measured these)")
    rows = model(cases)
    print("per kernel, lowest coalescing of its hot instructions:",
          ", ".join(f"{k} {v:.0%}" for k, v in sorted(per_kernel(rows).items())))
    if args.json:  # each row's figures and worst instruction, without its per-instruction list (bulky)
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "instrs"} for r in rows], indent=1,
                                        default=float))
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
