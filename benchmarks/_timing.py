"""Side-by-side timing for the benchmarks: every variant is timed once per round, rounds interleaved, and
the median per variant is reported, so that a noisy machine slows all variants alike."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, rounds: int = 30, warmup: int = 3,
                     inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, measured in interleaved rounds of `inner` calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def check(label: str, value: float, op: str, target: float) -> str:
    ok = value <= target if op == "<=" else value >= target
    return f"  {'MET' if ok else 'MISSED'}: {label}: {value:.2f} (target {op} {target})"
