"""The GPU performance model (benchmarks/gpu_model.py: the CUDA emulator's record of every launch and every
warp's global and shared memory requests) and its targets on small shapes, and the "auto" choice that follows
from what a GPU has measured. The figures are predictions; benchmarks/gpu_check.sh measures them on a GPU."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_model
from lightcnn import layers, ops
from lightcnn.ops import _library, dense
from lightcnn.ops._library import Config
from tests.cuda_emu.build import build

DENSE_AUTO = [
    (Config("cpu", torch.float32), "kernel"),  # measured on the CPU: 0.96x the step time, less memory
    (Config("cpu", torch.float64, channels_last=True), "kernel"),
    (Config("cpu", torch.float32, torch.bfloat16), "kernel"),
    (Config("cpu", torch.bfloat16), "reference"),  # no CPU bf16 kernel
    # CUDA: never timed on a GPU against the reference, so the reference in every configuration
    (Config("cuda", torch.float32), "reference"),
    (Config("cuda", torch.float32, tf32=True), "reference"),
    (Config("cuda", torch.float32, torch.bfloat16, channels_last=True), "reference"),
    (Config("cuda", torch.float64), "reference"),
    (Config("cuda", torch.bfloat16, channels_last=True), "reference"),
    (Config("cuda", torch.float16), "reference"),
]


@pytest.mark.parametrize("cfg, expected", DENSE_AUTO, ids=[str(c) for c, _ in DENSE_AUTO])
def test_dense_auto_takes_the_reference_on_cuda_until_a_gpu_measures_the_kernel(cfg, expected):
    assert ("kernel" if _library.auto_uses_kernel(dense.OP, cfg) else "reference") == expected


def test_backend_info_says_why_the_dense_op_runs_the_reference_on_cuda():
    table = ops.backend_info()["ops"]["dense_bn_relu_conv2d"]
    assert {v for k, v in table["auto"].items() if k.startswith("cuda")} == {"reference"}
    assert {v for k, v in table["auto"].items() if k.startswith("cpu")} == {"kernel"}
    assert "never timed on a GPU" in table["auto_reason"]
    layer = layers.backend_info()["layers"]["DenseConv2d"]
    assert layer["auto"] == table["auto"] and layer["auto_reason"] == table["auto_reason"]


# ---------------------------------------------------------------- the model (emulator's access recorder)

# Small enough for the fast suite (seconds once the emulator is built), and together every code path of the
# two ops: 16-byte vectors in both layouts in fp32 and bf16 (PreAct's H*W = 16 and C = 16 are multiples of 8),
# the one-element remainder paths and odd sizes ("odd"), the list-aware DenseNet kernels in both layouts.
CI_CASES = [
    gpu_model.Case("bn_relu_conv", "PreAct-164", (128, 16, 32, 32), hw=(4, 4)),
    gpu_model.Case("bn_relu_conv", "odd", (2, 6, 5, 3)),  # no vectors, one split: every remainder path
    gpu_model.Case("dense", "DenseNet-121", (64, 32, 56, 56), (16, 8, 8), hw=(2, 4)),
]
# The same targets on more channels (WRN-28-10's widest block, a DenseNet layer of 64): a minute or more.
BIG_CASES = [
    gpu_model.Case("bn_relu_conv", "WRN-28-10", (128, 160, 32, 32), hw=(4, 4)),
    gpu_model.Case("bn_relu_conv", "PreAct-164", (128, 16, 32, 32), hw=(4, 4)),
    gpu_model.Case("dense", "DenseNet-121", (64, 64, 56, 56), (32, 16, 16), hw=(4, 4)),
]

# Targets the kernels miss, with the figure and the reason (a fixed one must leave this table: the test
# fails when a listed miss is met, and on any miss not listed).
KNOWN_MISSES = {
    # (op, target, layout): why
    ("bn_relu_conv", "time", "NCHW"):
        "PreAct-164's 16-channel unit in bf16 is launch-bound: 8 launches against the reference's 6, predicted "
        "38 us against 34 on an H100 (fp32: 50 against 51, met)",
    ("bn_relu_conv", "time", "NHWC"): "as NCHW",
    ("dense", "coalescing per instruction", "NCHW"):
        "reduce_from's gradient load, 50-57%: the compiled code loads g only in the lanes whose pre-activation "
        "passes the ReLU (about half: 243 of 512 lanes at the CI's fp32 case, 31 requests against x's 32), so the "
        "useful bytes halve while the sectors stay (DRAM traffic unchanged); a GPU predicating the load alike "
        "would show the same",
    ("dense", "coalescing per instruction", "NHWC"):
        "bn_relu_into's bf16 loads at the CI's 2x4 recording: 67% (a feature of 8 channels is 16 bytes a pixel); "
        "the reductions, lanes along a pixel's channels, are 100%",
}
# and on the wider cases
# (the CI DenseNet case's bf16 bn_relu_into at 2x4 is the only per-instruction NHWC miss: the wider cases meet it)
KNOWN_MISSES_BIG = {k: v for k, v in KNOWN_MISSES.items() if k != ("dense", "coalescing per instruction", "NHWC")} | {
    ("bn_relu_conv", "coalescing overall", "NHWC"):
        "WRN-28-10 160 channels bf16: 87%; bn_relu and grad_input load a vector's 8 float parameters as two "
        "16-byte vectors a lane, 32 bytes apart lane to lane (80% a request at C = 160); L1 serves the second "
        "half of each sector, so DRAM traffic is not affected",
}


@pytest.fixture(scope="module")
def emu():
    build()  # the cached build, shared with test_cuda_emulated.py
    return torch.ops.lightcnn_emu


@pytest.fixture(scope="module")
def rows(emu):
    return gpu_model.model(CI_CASES, log=lambda *_: None)


@pytest.fixture(scope="module")
def big_rows(emu):
    return gpu_model.model(BIG_CASES, log=lambda *_: None)


def test_recorder_sees_a_vectorised_elementwise_kernel_exactly(emu):
    x = torch.randn(2, 8, 4, 4)
    E = emu
    E.emu_profile_begin(True)
    E.bn_relu_conv2d(x, None, None, None, None, torch.randn(3, 8, 1, 1), None, [1, 1], [0, 0], [1, 1], 1, True,
                     1e-5, None, 0.0)
    rec = json.loads(E.emu_profile_end())
    # the statistics' two passes (the second also computes scale and shift), then the elementwise kernel
    assert [ln["name"] for ln in rec] == ["partial_nchw_kernel", "finish_stats_kernel", "bn_relu_kernel"]
    ew = rec[2]
    assert ew["grid"] == [1, 1, 1] and ew["block"] == [256, 1, 1]
    assert ew["dram_written"] == x.numel() * 4  # y, once
    assert ew["dram_read"] == x.numel() * 4 + 2 * 32  # x, and scale and shift (8 floats each: one sector)
    vec = [i for i in ew["instrs"] if i["size"] == 16]  # x in, y out: 64 vectors of 4 floats, 2 warps
    assert sorted(i["op"] for i in vec) == ["load", "store"]
    assert all(i["requests"] == 2 and i["lanes"] == 64 and i["sector_bytes"] == 1024 == i["useful"] for i in vec)


def test_recorder_matches_lanes_by_their_kth_access_and_sees_strides(emu):
    E = emu
    E.emu_profile_begin(True)
    E.emu_selftest(torch.ones(1000), 0)  # one block of 256 threads sums 1000 floats, 4 strided rounds
    (ln,) = json.loads(E.emu_profile_end())
    loads = [i for i in ln["instrs"] if i["space"] == "global" and i["op"] == "load"]
    assert len(loads) == 1 and loads[0]["requests"] == 32 and loads[0]["lanes"] == 1000
    assert loads[0]["sector_bytes"] == loads[0]["useful"] == 4000  # fully coalesced (1000 * 4 B)
    shared = [i for i in ln["instrs"] if i["space"] == "shared"]
    assert shared and all(i["wavefronts"] == i["ideal_wavefronts"] for i in shared)  # no bank conflict


def test_launch_plan_mirrors_the_host_logic(rows):
    """The full-size grids come from gpu_model.launch_plan: at the small shapes it must give the launches the
    emulator saw."""
    cases = {c.name: c for c in CI_CASES}
    for r in rows:
        case = cases[r["case"]]
        seen: dict[str, list[int]] = {}
        for name, blocks in r["launch_blocks"]:
            if name in gpu_model.ACTIVATION_KERNELS:
                seen.setdefault(name, []).append(blocks)
        plan = gpu_model.launch_plan(case, gpu_model.DTYPES[r["dtype"]], r["layout"] == "NHWC", N=case.small_batch,
                                     hw=case.hw or gpu_model.recorded_hw(*case.shape[2:]))
        assert seen == plan, (r["case"], r["dtype"], r["layout"])


def _misses(rows):
    out = {}
    for r in rows:
        key = f"{r['case']} {r['dtype']} {r['layout']}"
        big = bool(r["waves"])  # the full-size shape moves > 1 MB a launch (not the odd case: launch-bound)
        # Coalescing and time are held on the real layers' shapes; the odd case (rows of 15 values, a few
        # hundred bytes a tensor) is there for the remainder paths and the launch plan.
        if big and r["coalescing_min"] < gpu_model.COALESCING_PER_INSTR:
            w = r["worst"]
            out[(r["op"], "coalescing per instruction", r["layout"])] = (key, r["coalescing_min"], w["kernel"])
        if big and r["coalescing_overall"] < gpu_model.COALESCING_OVERALL:
            out[(r["op"], "coalescing overall", r["layout"])] = (key, r["coalescing_overall"])
        if r["traffic_vs_compulsory"] > gpu_model.TRAFFIC_MAX:
            out[(r["op"], "traffic", r["layout"])] = (key, r["traffic_vs_compulsory"])
        if r["waves_min"] < gpu_model.WAVES_MIN:
            out[(r["op"], "waves", r["layout"])] = (key, r["waves_min"])
        if r["op"] == "bn_relu_conv" and big and r["predicted_us"]["H100"] > r["reference_us"]["H100"]:
            out[(r["op"], "time", r["layout"])] = (key, r["predicted_us"]["H100"], r["reference_us"]["H100"])
        if r["mergeable"]:
            out[(r["op"], "mergeable launches", r["layout"])] = (key, r["mergeable"])
    return out


@pytest.mark.parametrize("cases", ["rows", pytest.param("big_rows", marks=pytest.mark.slow)])
def test_the_kernels_meet_the_model_targets_or_are_listed_as_missing_them(cases, request):
    """Targets (benchmarks/gpu_model.py): every hot global access >= 80% coalesced and >= 90% overall, in both
    layouts; activation traffic <= 1.25x the compulsory; every launch moving > 1 MB at the full-size shape
    >= 2 waves of 132 SMs; the fused unit's predicted memory-bound time <= the unfused reference's; no two
    neighbouring launches that could be one."""
    misses = _misses(request.getfixturevalue(cases))
    known = KNOWN_MISSES if cases == "rows" else KNOWN_MISSES_BIG
    assert set(misses) - set(known) == set(), {k: misses[k] for k in set(misses) - set(known)}
    assert set(known) - set(misses) == set(), "met now: remove from KNOWN_MISSES"


def test_gpu_check_finds_the_predictions_of_every_case_it_measures():
    """benchmarks/gpu_check.sh runs `gpu_model.py --measure --predictions benchmarks/gpu_model.json`: the file
    (written by `gpu_model.py --json`) holds every case of the model in both dtypes and layouts, with the
    predicted and the reference's times that --measure prints beside the measured ones."""
    path = Path(gpu_model.ROOT) / "benchmarks" / "gpu_model.json"
    assert "--measure --predictions benchmarks/gpu_model.json" in (path.parent / "gpu_check.sh").read_text()
    rows = json.loads(path.read_text())
    assert sorted((r["case"], r["dtype"], r["layout"]) for r in rows) == sorted(
        (c.name, d, lay) for c in gpu_model.CASES for d in gpu_model.DTYPES for lay in gpu_model.LAYOUTS)
    for r in rows:
        assert set(r["predicted_us"]) == set(r["reference_us"]) == set(gpu_model.BANDWIDTH)
        assert all(t > 0 for t in (*r["predicted_us"].values(), *r["reference_us"].values()))
