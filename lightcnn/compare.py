"""Compare every network of lightcnn: parameters, MACs, activation memory, speed and published accuracy.

    python -m lightcnn.compare                                  # every registered model, CPU timings
    python -m lightcnn.compare --models "resnet*,vgg16" --no-speed   # quick: counts and memory only
    python -m lightcnn.compare --device cuda --batch-size 64 --out compare_h100

Writes OUT/compare.md (a Markdown table), OUT/compare.csv and OUT/compare.png: top-1 accuracy against
MACs with bubble area proportional to the parameters and one colour per family, in the style of the
classic comparison (Canziani, Paszke, Culurciello 2016), one panel per data set (ImageNet top-1,
CIFAR-10). Models without a published error are listed in the table but not plotted (the chart says
which).

What is measured, per model in its default configuration at its native input size
(`model.default_cfg["input_size"]`):
- params: trainable parameters (auxiliary heads included when the model builds them);
- MACs: `torch.utils.flop_counter.FlopCounterMode` FLOPs / 2, eval mode, batch 1, counted on `--device`
  (where the lightcnn kernels run: the counter sees inside `torch.ops.lightcnn.*` through their FLOP
  formulas);
- activation memory: the bytes of the tensors autograd saves for the backward pass of a training-mode
  forward (`torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded), per image
  at batch 2; on CUDA also the peak memory of a whole training step (`torch.cuda.max_memory_allocated`
  above the parameters, at `--batch-size`);
- speed: images/s of inference (eval, no grad) and of a training step (forward, backward, SGD step) at
  `--batch-size` on `--device` (fp32), timed for at least `--min-time` seconds after one warm-up step.
Published figures come from `lightcnn.published`.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightcnn import models
from lightcnn.published import published

COLUMNS = ("model", "family", "dataset", "input", "params", "gmacs", "act_mib_per_image", "infer_img_s",
           "train_img_s", "cuda_peak_mib", "top1_err", "top5_err", "published_params", "published_gmacs")


def select(patterns: str | Sequence[str] = "*") -> list[str]:
    """Model names for comma-separated shell patterns (`resnet*,vgg16`); a name without wildcards may be
    any accepted name, including pattern-built ones such as `wrn16_4`. Unknown names are a ValueError."""
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    names: list[str] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            found = models.list_models(pat)
            if not found:
                raise ValueError(f"no registered model matches {pat!r}; see lightcnn.models.list_models()")
        elif models.is_model(pat):
            found = [pat]
        else:
            close = difflib.get_close_matches(pat, models.list_models(), n=5, cutoff=0.5)
            raise ValueError(f"unknown model {pat!r}." + (f" Closest: {', '.join(close)}." if close else "")
                             + " See lightcnn.models.list_models() or use a pattern such as 'resnet*'.")
        names += [n for n in found if n not in names]
    return names


def build(name: str, device: str | torch.device = "cpu", impl: str | None = None) -> nn.Module:
    """The model in its default configuration; `impl` is passed to models that take it."""
    with torch.device(device):
        if impl is not None:
            try:
                return models.create(name, impl=impl)
            except TypeError:  # a model without kernel-backed layers
                pass
        return models.create(name)


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(out, y):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(F.cross_entropy(o, y) for o in outs)


def count_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """FlopCounterMode FLOPs / 2 of one eval-mode image (on the model's device)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_size, device=device)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def saved_activation_bytes(model: nn.Module, input_size: Sequence[int], batch: int = 2) -> int:
    """Bytes of the tensors autograd saves in a training-mode forward of `batch` images, each storage
    counted once, parameters excluded."""
    device = next(model.parameters()).device
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s._cdata not in params:
            seen[s._cdata] = s.nbytes()
        return t

    model.train()
    x = torch.zeros(batch, *input_size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(model: nn.Module, input_size: Sequence[int], batch: int, train: bool,
                      min_time: float = 1.0) -> float:
    device = next(model.parameters()).device
    x = torch.randn(batch, *input_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9) if train else None

    def step():
        if train:
            opt.zero_grad(set_to_none=True)
            _loss(model(x), y).backward()
            opt.step()
        else:
            with torch.inference_mode():
                model(x)

    model.train(train)
    step()  # warm-up (allocations, cuDNN algorithm choice)
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - start < min_time:
        step()
        n += 1
        _sync(device)
    return n * batch / (time.perf_counter() - start)


def cuda_peak_training_bytes(model: nn.Module, input_size: Sequence[int], batch: int) -> int:
    device = next(model.parameters()).device
    x = torch.randn(batch, *input_size, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _loss(model(x), y).backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    return peak


def measure(name: str, device: str = "cpu", speed: bool = True, batch_size: int | None = None,
            min_time: float = 1.0, impl: str | None = None) -> dict:
    """One row of the comparison (see the module docstring for what each column is)."""
    dev = torch.device(device)
    model = build(name, dev, impl)
    input_size = tuple(model.default_cfg["input_size"])
    pub = published(name)
    row = {"model": name, "family": type(model).__module__.rsplit(".", 1)[-1],
               "dataset": model.default_cfg.get("dataset", ""), "input": "x".join(map(str, input_size[1:])),
               "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "gmacs": count_macs(model, input_size) / 1e9,
               "act_mib_per_image": saved_activation_bytes(model, input_size) / 2 / 2**20,
               "infer_img_s": None, "train_img_s": None, "cuda_peak_mib": None,
               "top1_err": pub.top1_err if pub else None, "top5_err": pub.top5_err if pub else None,
               "published_params": pub.params if pub else None, "published_gmacs": pub.gmacs if pub else None}
    if speed:
        batch = batch_size or (64 if dev.type == "cuda" else 8)
        row["infer_img_s"] = images_per_second(model, input_size, batch, False, min_time)
        row["train_img_s"] = images_per_second(model, input_size, batch, True, min_time)
        if dev.type == "cuda":
            row["cuda_peak_mib"] = cuda_peak_training_bytes(model, input_size, batch) / 2**20
    return row


def compare(names: Sequence[str], device: str = "cpu", speed: bool = True, batch_size: int | None = None,
            min_time: float = 1.0, impl: str | None = None, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(names, desc="measuring", unit="model", disable=not progress, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(measure(name, device, speed, batch_size, min_time, impl))
    return rows


# --- outputs ---------------------------------------------------------------------------------------------


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("params", "published_params"):
        return f"{v:,}"
    if key in ("top1_err", "top5_err"):
        return str(v)  # as published
    if key in ("gmacs", "published_gmacs"):
        return f"{v:.4g}"
    if key == "act_mib_per_image":
        return f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def markdown(rows: Sequence[dict], device: str) -> str:
    head = ("| model | family | data | input | params | GMACs | act. MiB/img (train) | infer img/s | train img/s"
            " | CUDA peak MiB | top-1 err % | top-5 err % |")
    keys = ("model", "family", "dataset", "input", "params", "gmacs", "act_mib_per_image", "infer_img_s",
            "train_img_s", "cuda_peak_mib", "top1_err", "top5_err")
    lines = [head, "|" + "---|" * 4 + "---:|" * 8]
    lines += ["| " + " | ".join(_fmt(k, r[k]) for k in keys) + " |" for r in rows]
    timed = any(r["infer_img_s"] is not None for r in rows)
    speed = 'Speed on ' + device + ', fp32' if timed else 'Speed not measured (--no-speed)'
    lines.append(f"\n{speed}. Errors: published (lightcnn.published): ImageNet top-1/top-5 for "
                 "ImageNet models, CIFAR-10 test error for CIFAR models.")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


PANELS = (("imagenet", "ImageNet", "top-1 accuracy (%)"), ("cifar10", "CIFAR-10", "test accuracy (%)"))


def chart(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy against GMACs, bubble area ~ parameters, one colour per family, one panel per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [r for r in rows if r["top1_err"] is not None and r["dataset"] in {p[0] for p in PANELS}]
    families = sorted({r["family"] for r in plotted})
    colour = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    panels = [p for p in PANELS if any(r["dataset"] == p[0] for r in rows)] or [PANELS[0]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5.5), squeeze=False)
    biggest = max((r["params"] for r in rows), default=1)

    def area(params: float) -> float:
        return 30 + 2000 * params / biggest

    for ax, (dataset, name, ylabel) in zip(axes[0], panels):
        pts = [r for r in plotted if r["dataset"] == dataset]
        for r in pts:
            ax.scatter(r["gmacs"], 100 - r["top1_err"], s=area(r["params"]), color=colour[r["family"]], alpha=0.6,
                       edgecolors="k", linewidths=0.5)
            ax.annotate(r["model"], (r["gmacs"], 100 - r["top1_err"]), fontsize=7, xytext=(5, 5),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("GMACs per image (FlopCounterMode, native input)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: published accuracy against operations", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if pts:
            ys, xs = [100 - r["top1_err"] for r in pts], [r["gmacs"] for r in pts]
            ax.set_ylim(min(ys) - 1.5, max(ys) + 1.5)
            ax.set_xlim(min(xs) / 2, max(xs) * 2.5)
        else:
            ax.text(0.5, 0.5, "no model with a published error", transform=ax.transAxes, ha="center")
        missing = [r["model"] for r in rows if r["dataset"] == dataset and r["top1_err"] is None]
        if missing:
            ax.text(0, -0.13, _wrap("Not plotted (no published top-1 error): " + ", ".join(missing), 100),
                    transform=ax.transAxes, fontsize=7, va="top", color="0.3")
    handles = [plt.scatter([], [], s=60, color=colour[f], alpha=0.6, edgecolors="k", label=f) for f in families]
    handles += [plt.scatter([], [], s=area(n), color="0.85", edgecolors="k", label=f"{n / 1e6:g}M params")
                for n in (1e6, 10e6, 50e6, 100e6) if n <= biggest * 1.5]
    others = [r["model"] for r in rows if r["dataset"] not in {p[0] for p in PANELS}]
    title = "family / bubble area ~ parameters"
    if others:
        title += "\n" + _wrap("not plotted (other data set): " + ", ".join(others), 30)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
               title=title, title_fontsize=8, labelspacing=2.0, handletextpad=1.8, borderpad=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def write(rows: Sequence[dict], out: str | Path, device: str = "cpu") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown(rows, device))
    return [out / "compare.md", write_csv(rows, out / "compare.csv"), chart(rows, out / "compare.png")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightcnn.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default="*", help="comma-separated names or shell patterns (default: every "
                   "registered model); pattern-built names such as wrn16_4 are accepted by name")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where speed is measured")
    p.add_argument("--out", default="compare", help="output folder (default: %(default)s)")
    p.add_argument("--no-speed", action="store_true", help="skip the timings (counts and memory only: quick)")
    p.add_argument("--batch-size", type=int, help="batch of the timings (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds each timing runs at least (default: 1)")
    p.add_argument("--impl", choices=("kernel", "reference"), help="kernel-backed layers on the lightcnn kernels "
                   "or on the PyTorch reference (default: the global default)")
    args = p.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        names = select(args.models)
        rows = compare(names, args.device, not args.no_speed, args.batch_size, args.min_time, args.impl)
    except ValueError as e:
        print(f"lightcnn.compare: error: {e}", file=sys.stderr)
        return 2
    paths = write(rows, args.out, args.device)
    print(markdown(rows, args.device))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
