"""Compare every network of lightcnn: parameters, MACs, activation memory, speed and published accuracy.

    python -m lightcnn.compare                                  # every registered model, CPU timings
    python -m lightcnn.compare --models "resnet*,vgg16" --no-speed   # quick: counts and memory only
    python -m lightcnn.compare --device cuda --batch-size 64 --out compare_h100
    python -m lightcnn.compare --results runs/ --no-speed       # your trained accuracies beside the papers'

Writes OUT/compare.md (a Markdown table, with the source of every published error), OUT/compare.csv and
OUT/compare.png: accuracy against MACs with bubble area proportional to the parameters and one colour per
family, in the style of the classic comparison (Canziani, Paszke, Culurciello 2016), one panel per data
set (ImageNet top-1, CIFAR-10; CIFAR-100 and others where your runs are). Models without a published
error are listed in the table but not plotted (the chart says which). OUT is created and checked before
anything is measured; the table and the CSV are rewritten (atomically) as each model is measured, so an
interruption (Ctrl-C: exit 130) keeps every finished row, and the chart of those.

With `--results RUNS_FOLDER`, every run folder of `lightcnn.fit` under it (config.yaml, checkpoints/)
adds its model's test top-1 accuracy as a star beside the papers' bubble, and a "Your runs" table
(OUT/results.csv): read from the newest metrics table in the run folder with a test/acc1 column or key
(the run's metrics CSV, Lightning's CSVLogger metrics.csv, W&B's wandb-summary.json), else the best
accuracy that a checkpoint's ModelCheckpoint monitored (a validation figure: the table says which).
Without --models, the runs' models are the ones measured.

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
  `--batch-size` on `--device` (fp32): untimed warm-up steps for `--warmup` seconds (so that the order of
  the models does not change the figures), then single steps timed for at least `--min-time` seconds, in
  five rounds: the median step time of the fastest round; on CPU with torch's threads, or `--threads` (the
  table says how many: on a machine shared with other jobs, several threads wait on each other and
  `--threads 1` gives stable figures).
Published figures come from `lightcnn.published`.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightcnn import models
from lightcnn.layers import IMPLS, Impl, default_impl, resolve_impl
from lightcnn.published import published

COLUMNS = ("model", "family", "dataset", "input", "params", "gmacs", "act_mib_per_image", "infer_img_s",
           "train_img_s", "cuda_peak_mib", "top1_err", "top5_err", "published_params", "published_gmacs", "c100_err",
           "source")


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


def build(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The model in its default configuration (its kernel-backed layers follow the process-wide default impl)."""
    with torch.device(device):
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


def seconds_per_step(step: Callable[[], object], min_time: float = 1.0, warmup: float | None = None,
                     clock: Callable[[], float] = time.perf_counter, sync: Callable[[], object] = lambda: None
                     ) -> float:
    """The median duration of `step()` (followed by `sync()`), after a warm-up.

    Warm-up: `step` runs for `warmup` seconds (default: half of `min_time`) and at least WARMUP_STEPS
    times, untimed, so that what a first call pays once (thread pools, allocator, oneDNN/cuDNN algorithm
    choice, the CPU clock ramping up) is not charged to whichever model happens to be timed first. Then
    each call is timed on its own for at least `min_time` seconds and TIMED_STEPS calls. The timed calls
    form ROUNDS consecutive rounds (one round when there are fewer than TIMED_STEPS calls a round) and the
    figure is the median of the fastest round: the median is robust to a short pause, the fastest round to
    another process slowing the machine down for a part of the timing (noise only ever adds time). The
    garbage the previous model left is collected first, so that no collection of it falls into this timing."""
    warmup = min_time / 2 if warmup is None else warmup
    gc.collect()
    n, start = 0, clock()
    while n < WARMUP_STEPS or clock() - start < warmup:
        step()
        sync()
        n += 1
    times: list[float] = []
    start = clock()
    while len(times) < TIMED_STEPS or clock() - start < min_time:
        t0 = clock()
        step()
        sync()
        times.append(clock() - t0)
    per_round = len(times) // ROUNDS
    if per_round < TIMED_STEPS:
        return statistics.median(times)
    return min(statistics.median(times[i * per_round:(i + 1) * per_round]) for i in range(ROUNDS))


WARMUP_STEPS, TIMED_STEPS, ROUNDS = 3, 5, 5


def images_per_second(model: nn.Module, input_size: Sequence[int], batch: int, train: bool,
                      min_time: float = 1.0, warmup: float | None = None) -> float:
    """Images/s of inference (`train=False`: eval, inference mode) or of a training step (forward, backward,
    SGD step) at `batch`, from the median step time after a warm-up (`seconds_per_step`)."""
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
    return batch / seconds_per_step(step, min_time, warmup, sync=lambda: _sync(device))


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
            min_time: float = 1.0, impl: Impl | None = None, warmup: float | None = None) -> dict:
    """One row of the comparison (see the module docstring for what each column is). `impl` ("auto", "kernel",
    "reference"; None: the process-wide default) is the default of lightcnn.layers while the model is measured,
    so every kernel-backed layer chooses its path as it does in training (lightcnn.layers._impl)."""
    with default_impl(resolve_impl(impl)):
        return _measure(name, device, speed, batch_size, min_time, warmup)


def _measure(name: str, device: str, speed: bool, batch_size: int | None, min_time: float,
             warmup: float | None) -> dict:
    dev = torch.device(device)
    model = build(name, dev)
    input_size = tuple(model.default_cfg["input_size"])
    pub = published(name)
    row = {"model": name, "family": type(model).__module__.rsplit(".", 1)[-1],
           "dataset": model.default_cfg.get("dataset", ""), "input": "x".join(map(str, input_size[1:])),
           "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "gmacs": count_macs(model, input_size) / 1e9,
           "act_mib_per_image": saved_activation_bytes(model, input_size) / 2 / 2**20,
           "infer_img_s": None, "train_img_s": None, "cuda_peak_mib": None,
           "top1_err": pub.top1_err if pub else None, "top5_err": pub.top5_err if pub else None,
           "published_params": pub.params if pub else None, "published_gmacs": pub.gmacs if pub else None,
           "c100_err": pub.c100_err if pub else None, "source": pub.source if pub else ""}
    if speed:
        batch = batch_size or (64 if dev.type == "cuda" else 8)
        row["infer_img_s"] = images_per_second(model, input_size, batch, False, min_time, warmup)
        row["train_img_s"] = images_per_second(model, input_size, batch, True, min_time, warmup)
        if dev.type == "cuda":
            row["cuda_peak_mib"] = cuda_peak_training_bytes(model, input_size, batch) / 2**20
    return row


def compare(names: Sequence[str], device: str = "cpu", speed: bool = True, batch_size: int | None = None,
            min_time: float = 1.0, impl: Impl | None = None, progress: bool = True, warmup: float | None = None,
            on_row: Callable[[dict], object] | None = None) -> list[dict]:
    """The rows of `names`, measured in order; `on_row(row)` is called as each one is done (the CLI
    writes the table there, so that an interruption keeps what was measured)."""
    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(names, desc="measuring", unit="model", disable=not progress, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(measure(name, device, speed, batch_size, min_time, impl, warmup))
        if on_row is not None:
            on_row(rows[-1])
    return rows


# --- one's own runs ---------------------------------------------------------------------------------------

DATA_MODULES = {"CIFAR10DataModule": "cifar10", "CIFAR100DataModule": "cifar100", "ImageNetDataModule": "imagenet",
                "DigitsDataModule": "digits", "SyntheticDataModule": "synthetic"}
ACC_KEYS = ("test/acc1", "test_acc1", "test/acc")  # what lightcnn.test logs, then older spellings


def _as_percent(v: float) -> float:
    return 100 * v if v <= 1.0 else v  # lightcnn logs accuracy as a fraction


def _metric_from_tables(run: Path) -> tuple[float, str] | None:
    """The last logged test top-1 accuracy in a metrics table of the run folder: a CSV with a test/acc1
    column (Lightning's CSVLogger `metrics.csv`, the run folder's metrics CSV) or a JSON object with a
    test/acc1 key (W&B's `wandb-summary.json`); the newest file wins."""
    found: list[tuple[float, float, str]] = []
    files = sorted(run.rglob("*.csv")) + sorted(run.rglob("*.json"))
    for f in files:
        if not f.is_file() or f.stat().st_size > 50 * 2**20:
            continue
        try:
            if f.suffix == ".csv":
                with open(f, newline="") as fh:
                    rows = list(csv.DictReader(fh))
                key = next((k for k in ACC_KEYS if rows and k in rows[0]), None)
                vals = [r[key] for r in rows if key and r.get(key) not in (None, "")]
                if vals:
                    found.append((f.stat().st_mtime, float(vals[-1]), f"{key} in {f.relative_to(run)}"))
            else:
                data = json.loads(f.read_text())
                key = next((k for k in ACC_KEYS if isinstance(data, dict) and k in data), None)
                if key is not None and isinstance(data[key], (int, float)):
                    found.append((f.stat().st_mtime, float(data[key]), f"{key} in {f.relative_to(run)}"))
        except (OSError, ValueError, csv.Error, UnicodeDecodeError):
            continue  # not a metrics table
    if not found:
        return None
    _, value, where = max(found, key=lambda t: t[0])
    return value, where


def _metric_from_checkpoints(run: Path) -> tuple[float, str, dict] | None:
    """The best monitored accuracy that a checkpoint's ModelCheckpoint state records (a validation metric
    when nothing else was logged), with the checkpoint's hyper-parameters."""
    for ckpt in sorted(run.rglob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name)):
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # noqa: BLE001 - a damaged checkpoint: try the next
            continue
        hp = dict(state.get("hyper_parameters") or {})
        for cb in (state.get("callbacks") or {}).values():
            monitored = isinstance(cb, dict) and "acc" in str(cb.get("monitor") or "")
            if monitored and cb.get("best_model_score") is not None:
                return float(cb["best_model_score"]), f"best {cb['monitor']} in {ckpt.relative_to(run)}", hp
        if hp:
            return None if not hp.get("model") else (float("nan"), "", hp)
    return None


def read_run(run: str | Path) -> dict | None:
    """What one run folder of `lightcnn.fit`/`lightcnn.test` says about itself: {"run", "model", "dataset",
    "acc1" (top-1 accuracy %, NaN when none was logged), "metric" (where it was read)}; None for a folder
    that is no run (no config.yaml and no checkpoint).

    The model and data set come from the run's config.yaml (`model.model`, `data.class_path`), else from
    a checkpoint's hyper-parameters; the accuracy from the newest metrics table that has a test/acc1
    column or key, else from the best accuracy a checkpoint's ModelCheckpoint monitored."""
    import yaml

    run = Path(run)
    config = run / "config.yaml"
    if not config.is_file() and not any(run.glob("checkpoints/*.ckpt")):
        return None
    model = dataset = None
    if config.is_file():
        try:
            cfg = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        section = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
        section = section.get("init_args", section) if isinstance(section.get("init_args"), dict) else section
        model = section.get("model") if isinstance(section.get("model"), str) else None  # a subclassed module too
        data = cfg.get("data") or {}
        cls = str(data.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(data, dict) else ""
        dataset = DATA_MODULES.get(cls, cls.removesuffix("DataModule").lower() or None)
    table = _metric_from_tables(run)
    from_ckpt = _metric_from_checkpoints(run) if table is None or model is None else None
    if model is None and from_ckpt is not None:
        model = from_ckpt[2].get("model")
    if table is not None:
        acc, metric = _as_percent(table[0]), table[1]
    elif from_ckpt is not None and from_ckpt[1]:
        acc, metric = _as_percent(from_ckpt[0]), from_ckpt[1]
    else:
        acc, metric = float("nan"), "no test/acc1 logged"
    return {"run": str(run), "model": model, "dataset": dataset or "", "acc1": acc, "metric": metric}


def read_runs(folder: str | Path) -> list[dict]:
    """Every run folder at or under `folder` (`runs/NAME/TIMESTAMP`), in path order. A missing folder or
    one without runs is a ValueError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--results {str(folder)!r} is no folder (give a folder of lightcnn.fit runs, e.g. runs/)")
    candidates = [folder] + sorted({p.parent for p in folder.rglob("config.yaml")}
                                   | {p.parent.parent for p in folder.rglob("checkpoints/*.ckpt")})
    runs, seen = [], set()
    for c in candidates:
        if c in seen:
            continue
        seen.add(c)
        r = read_run(c)
        if r is not None and r["model"]:
            runs.append(r)
    if not runs:
        raise ValueError(f"--results {str(folder)!r} holds no run folder of lightcnn.fit (config.yaml and "
                         f"checkpoints/ inside)")
    return runs


# --- outputs ---------------------------------------------------------------------------------------------


def _fmt(key: str, v) -> str:
    if v is None:
        return "-"
    if key in ("params", "published_params"):
        return f"{v:,}"
    if key in ("top1_err", "top5_err", "c100_err"):
        return str(v)  # as published
    if key in ("gmacs", "published_gmacs"):
        return f"{v:.4g}"
    if key == "act_mib_per_image":
        return f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def markdown(rows: Sequence[dict], device: str, runs: Sequence[dict] = ()) -> str:
    head = ("| model | family | data | input | params | GMACs | act. MiB/img (train) | infer img/s | train img/s"
            " | CUDA peak MiB | top-1 err % | top-5 err % | C100 err % |")
    keys = ("model", "family", "dataset", "input", "params", "gmacs", "act_mib_per_image", "infer_img_s",
            "train_img_s", "cuda_peak_mib", "top1_err", "top5_err", "c100_err")
    lines = [head, "|" + "---|" * 4 + "---:|" * 9]
    lines += ["| " + " | ".join(_fmt(k, r.get(k)) for k in keys) + " |" for r in rows]
    timed = any(r["infer_img_s"] is not None for r in rows)
    n = torch.get_num_threads()
    threads = f" ({n} CPU thread{'s' if n > 1 else ''})" if device == "cpu" else ""
    speed = (f"Speed on {device}{threads}, fp32, median step of the fastest round after a warm-up" if timed
             else "Speed not measured (--no-speed)")
    lines.append(f"\n{speed}. Errors: published (lightcnn.published): ImageNet top-1/top-5 for "
                 "ImageNet models, CIFAR-10 (and CIFAR-100) test error for CIFAR models.")
    sources = [(r["model"], r["source"]) for r in rows if r.get("source")]
    if sources:
        lines.append("\nSources of the published errors:\n")
        lines += [f"- {m}: {src}" for m, src in sources]
    if runs:
        lines += ["\nYour runs (--results):\n", "| run | model | data | top-1 acc % | read from | published acc % |",
                  "|---|---|---|---:|---|---:|"]
        for r in runs:
            pub = _published_acc(r["model"], r["dataset"])
            acc = "-" if r["acc1"] != r["acc1"] else f"{r['acc1']:.2f}"
            lines.append(f"| {r['run']} | {r['model']} | {r['dataset'] or '-'} | {acc} | {r['metric']} | "
                         f"{'-' if pub is None else f'{pub:.2f}'} |")
    return "\n".join(lines) + "\n"


def _published_acc(model: str, dataset: str) -> float | None:
    """The published top-1 accuracy (%) of `model` on `dataset`, if any."""
    pub = published(model)
    if pub is None:
        return None
    err = pub.c100_err if dataset == "cifar100" else pub.top1_err
    cifar_model = pub.input_side == 32  # published.py: CIFAR errors for the 32x32 models, ImageNet's otherwise
    if err is None or dataset not in (("cifar10", "cifar100") if cifar_model else ("imagenet",)):
        return None
    return 100 - err


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str] = ()) -> Path:
    with _atomic(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns or COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


class _atomic:
    """A text file written to a temporary file in the target's folder and renamed over the target when
    complete: a reader (or an interruption) never sees half a table."""

    def __init__(self, path: Path, **kwargs):
        self.path, self.kwargs = Path(path), kwargs

    def __enter__(self):
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, "w", **self.kwargs)
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def _write_text(path: Path, text: str) -> None:
    with _atomic(path) as f:
        f.write(text)


PANELS = {"imagenet": ("ImageNet", "top-1 accuracy (%)"), "cifar10": ("CIFAR-10", "test accuracy (%)"),
          "cifar100": ("CIFAR-100", "test accuracy (%)")}


def chart_points(rows: Sequence[dict], runs: Sequence[dict] = ()) -> dict[str, list[dict]]:
    """The points of the chart, per panel (data set): the papers' (kind "published") and one's own runs'
    (kind "run"), each with model, family, gmacs, params and acc (%). Published CIFAR-100 errors are drawn
    only where own CIFAR-100 runs are."""
    by_model = {r["model"]: r for r in rows}
    own_sets = {r["dataset"] for r in runs if r["acc1"] == r["acc1"] and r["model"] in by_model}
    points: dict[str, list[dict]] = {}

    def add(dataset, r, acc, kind, label):
        points.setdefault(dataset, []).append({"model": r["model"], "family": r["family"], "gmacs": r["gmacs"],
                                               "params": r["params"], "acc": acc, "kind": kind, "label": label})

    for r in rows:
        if r["dataset"] in ("imagenet", "cifar10") and r["top1_err"] is not None:
            add(r["dataset"], r, 100 - r["top1_err"], "published", r["model"])
        if r["dataset"] == "cifar10" and r.get("c100_err") is not None and "cifar100" in own_sets:
            add("cifar100", r, 100 - r["c100_err"], "published", r["model"])
    for run in runs:
        r = by_model.get(run["model"])
        if r is not None and run["acc1"] == run["acc1"]:
            add(run["dataset"] or r["dataset"], r, run["acc1"], "run", f"{run['model']} (yours)")
    return points


def chart(rows: Sequence[dict], path: Path, runs: Sequence[dict] = ()) -> Path:
    """Accuracy against GMACs, bubble area ~ parameters, one colour per family, one panel per data set;
    one's own runs as stars beside the papers' bubbles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = chart_points(rows, runs)
    order = [d for d in PANELS if d in points or any(r["dataset"] == d for r in rows)]
    order += [d for d in points if d not in order]
    order = order or ["imagenet"]
    families = sorted({p["family"] for pts in points.values() for p in pts})
    colour = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    fig, axes = plt.subplots(1, len(order), figsize=(7 * len(order), 5.5), squeeze=False)
    biggest = max((r["params"] for r in rows), default=1)

    def area(params: float) -> float:
        return 30 + 2000 * params / biggest

    for ax, dataset in zip(axes[0], order):
        name, ylabel = PANELS.get(dataset, (dataset, "test accuracy (%)"))
        pts = points.get(dataset, [])
        for p in pts:
            if p["kind"] == "published":
                ax.scatter(p["gmacs"], p["acc"], s=area(p["params"]), color=colour[p["family"]], alpha=0.6,
                           edgecolors="k", linewidths=0.5)
            else:
                ax.scatter(p["gmacs"], p["acc"], s=160, marker="*", color=colour[p["family"]], edgecolors="k",
                           linewidths=0.8, zorder=3)
            ax.annotate(p["label"], (p["gmacs"], p["acc"]), fontsize=7, xytext=(5, 5), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("GMACs per image (FlopCounterMode, native input)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{name}: accuracy against operations (published" + (", and yours)" if any(
            p["kind"] == "run" for p in pts) else ")"), fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if pts:
            ys, xs = [p["acc"] for p in pts], [p["gmacs"] for p in pts]
            ax.set_ylim(min(ys) - 1.5, max(ys) + 1.5)
            ax.set_xlim(min(xs) / 2, max(xs) * 2.5)
        else:
            ax.text(0.5, 0.5, "no model with a published error", transform=ax.transAxes, ha="center")
        missing = [r["model"] for r in rows if r["dataset"] == dataset and dataset != "cifar100"
                   and r["top1_err"] is None]
        if missing:
            ax.text(0, -0.13, _wrap("Not plotted (no published top-1 error): " + ", ".join(missing), 100),
                    transform=ax.transAxes, fontsize=7, va="top", color="0.3")
    handles = [plt.scatter([], [], s=60, color=colour[f], alpha=0.6, edgecolors="k", label=f) for f in families]
    handles += [plt.scatter([], [], s=area(n), color="0.85", edgecolors="k", label=f"{n / 1e6:g}M params")
                for n in (1e6, 10e6, 50e6, 100e6) if n <= biggest * 1.5]
    if runs:
        handles.append(plt.scatter([], [], s=160, marker="*", color="0.85", edgecolors="k", label="your run"))
    others = [r["model"] for r in rows if r["dataset"] not in order]
    title = "family / bubble area ~ parameters"
    if others:
        title += "\n" + _wrap("not plotted (other data set): " + ", ".join(others), 30)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
               title=title, title_fontsize=8, labelspacing=2.0, handletextpad=1.8, borderpad=1)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def prepare_out(out: str | Path) -> Path:
    """Create `out` and check that a file can be written there, before anything is measured; a ValueError
    saying why not otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {str(out)!r} is not writable ({e.strerror or e}); choose another folder") from None
    return out


def write(rows: Sequence[dict], out: str | Path, device: str = "cpu", runs: Sequence[dict] = (),
          plot: bool = True) -> list[Path]:
    """compare.md, compare.csv (and results.csv with --results), each replaced atomically, and the chart."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "compare.md", markdown(rows, device, runs))
    paths = [out / "compare.md", write_csv(rows, out / "compare.csv")]
    if runs:
        paths.append(write_csv(runs, out / "results.csv", ("run", "model", "dataset", "acc1", "metric")))
    if plot and rows:
        paths.append(chart(rows, out / "compare.png", runs))
    return paths


def busy_note(device: str, speed: bool, load: float | None = None, cores: int | None = None) -> str:
    """A warning when CPU timings with several threads run on a machine busier than its cores (else ""): there
    the threads of one step wait for each other to be scheduled and the figures drop by orders of magnitude."""
    threads = torch.get_num_threads()
    if device != "cpu" or not speed or threads == 1:
        return ""
    load = os.getloadavg()[0] if load is None else load
    if cores is None:  # the cores this process may use (a container's share), else the machine's
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load <= cores:
        return ""
    return (f"the load average ({load:.1f}) exceeds the {cores} CPU cores: timings on {threads} threads wait for "
            "other jobs; --threads 1 gives stable figures")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lightcnn.compare", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--models", default=None, help="comma-separated names or shell patterns (default: every "
                   "registered model; with --results: the runs' models); pattern-built names such as wrn16_4 "
                   "are accepted by name")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where speed is measured")
    p.add_argument("--out", default="compare", help="output folder (default: %(default)s)")
    p.add_argument("--no-speed", action="store_true", help="skip the timings (counts and memory only: quick)")
    p.add_argument("--batch-size", type=int, help="batch of the timings (default: 8 on CPU, 64 on CUDA)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds each timing runs at least (default: 1)")
    p.add_argument("--warmup", type=float, help="seconds of untimed steps before each timing (default: half "
                   "of --min-time; at least 3 steps)")
    p.add_argument("--threads", type=int, help="CPU threads of the timings (torch.set_num_threads; default: torch's, "
                   "one per core); on a machine shared with other jobs --threads 1 gives stable figures")
    p.add_argument("--impl", choices=IMPLS, help="the default implementation of the kernel-backed layers while "
                   "measuring, chosen per call as in training (lightcnn.layers: auto = the kernel where measured "
                   "faster; kernel; reference = PyTorch ops); default: the process-wide default")
    p.add_argument("--results", metavar="RUNS_FOLDER", help="plot the test accuracy of your own runs (run folders "
                   "of lightcnn.fit at or under RUNS_FOLDER) beside the papers'")
    args = p.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.min_time < 0 or (args.warmup is not None and args.warmup < 0):
            raise ValueError("--min-time and --warmup must be >= 0 seconds")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        runs = read_runs(args.results) if args.results else []
        unknown = sorted({r["model"] for r in runs if not models.is_model(r["model"])})
        if unknown:
            print(f"lightcnn.compare: note: not registered here, not plotted: {', '.join(unknown)}", file=sys.stderr)
        run_models = list(dict.fromkeys(r["model"] for r in runs if r["model"] not in unknown))
        names = select(args.models or ("*" if not runs else ",".join(run_models)))
        names += [m for m in run_models if m not in names]  # a run is plotted at its own model's MACs
        out = prepare_out(args.out)
    except ValueError as e:
        print(f"lightcnn.compare: error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    busy = busy_note(args.device, not args.no_speed)
    if busy:
        print(f"lightcnn.compare: note: {busy}", file=sys.stderr)
    rows: list[dict] = []

    def keep(row: dict) -> None:  # the table so far, on disk as soon as each model is measured
        rows.append(row)
        write(rows, out, args.device, runs, plot=False)

    try:
        compare(names, args.device, not args.no_speed, args.batch_size, args.min_time, args.impl, warmup=args.warmup,
                on_row=keep)
    except KeyboardInterrupt:
        paths = write(rows, out, args.device, runs)
        print(f"\nlightcnn.compare: interrupted: kept the {len(rows)} of {len(names)} models measured in "
              f"{', '.join(map(str, paths)) or str(out)}", file=sys.stderr)
        return 130
    except ValueError as e:
        print(f"lightcnn.compare: error: {e}", file=sys.stderr)
        return 2
    paths = write(rows, out, args.device, runs)
    print(markdown(rows, args.device, runs))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
