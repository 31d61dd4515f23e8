"""What `ClassifierModule` reports beside its metrics: the test's per-class accuracy and confusion matrix,
the model's parameters and MACs, and the guard rails that catch a network fed the wrong input size.

After every test (`python -m lightcnn.test`, and the test that ends a fit) the run folder gets:
- `per_class_accuracy.csv`: class index, name, test images of the class, correct, accuracy;
- `confusion_matrix.csv` (rows: true class, columns: predicted class) and `confusion_matrix.png`;
- `test_metrics.json`: the final test metrics (read by `python -m lightcnn.runs`).
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def data_eval_config(datamodule: Any) -> dict[str, Any]:
    """How the data module feeds evaluation images (`in_chans`, `image_size`, `mean`, `std`, `resize_size`),
    as far as it says (`ClassificationDataModule.eval_config`); {} for a data module that does not."""
    get = getattr(datamodule, "eval_config", None)
    try:
        return dict(get()) if callable(get) else {}
    except Exception:  # a data module that cannot tell (e.g. not set up): no facts rather than a failure
        return {}


def _side(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def example_input(net: nn.Module, eval_cfg: dict[str, Any]) -> torch.Tensor | None:
    """One zero image of the size the data feeds (else the network's `default_cfg` input size), so that
    Lightning's model summary counts FLOPs and shows the layers' output shapes."""
    cfg = getattr(net, "default_cfg", None) or {}
    side = _side(eval_cfg.get("image_size")) or (tuple(cfg["input_size"][1:]) if "input_size" in cfg else None)
    chans = eval_cfg.get("in_chans") or getattr(net, "in_chans", None) or (cfg.get("input_size") or [None])[0]
    if side is None or chans is None:
        return None
    return torch.zeros(1, int(chans), *side)


def params_and_macs(net: nn.Module, example: torch.Tensor | None) -> dict[str, int]:
    """Parameters of the network and its multiply-accumulates for one image (torch.utils.flop_counter:
    FLOPs / 2), in eval mode."""
    out = {"params": sum(p.numel() for p in net.parameters())}
    if example is None:
        return out
    p = next(net.parameters(), None)
    x = example.to(p.device if p is not None else "cpu")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        out["macs"] = counter.get_total_flops() // 2 // x.shape[0]
    except Exception as e:  # a network the counter cannot trace: the parameters alone
        rank_zero_info(f"lightcnn: MACs not counted ({type(e).__name__}: {e})")
    finally:
        net.train(was_training)
    return out


def warn_input_size_mismatch(model: str, model_kwargs: dict, net: nn.Module, eval_cfg: dict[str, Any]) -> str | None:
    """Warn (and return the message) when the network's `default_cfg` input size differs from the data's,
    naming a variant of the network that expects the data's size (another value of a `stem` knob)."""
    cfg = getattr(net, "default_cfg", None) or {}
    data = _side(eval_cfg.get("image_size"))
    if "input_size" not in cfg or data is None:
        return None
    expected = tuple(cfg["input_size"][1:])
    if expected == data:
        return None
    msg = (f"{model} expects {expected[0]}x{expected[1]} inputs (its default_cfg) but the data gives "
           f"{data[0]}x{data[1]}.")
    fit = _variant_for(model, model_kwargs, net, data)
    msg += (f" The variant made for {data[0]}x{data[1]}: --model.model_kwargs '{fit}'." if fit
            else " Check that this network suits the data (e.g. a CIFAR variant for 32x32 images).")
    warnings.warn(msg, UserWarning, stacklevel=2)
    return msg


def _variant_for(model: str, model_kwargs: dict, net: nn.Module, side: tuple[int, int]) -> str | None:
    import typing

    from lightcnn.models import create

    try:
        hint = typing.get_type_hints(type(net).__init__).get("stem")
    except Exception:
        return None
    if typing.get_origin(hint) is not typing.Literal:
        return None
    for value in typing.get_args(hint):
        if value == getattr(net, "stem", None):
            continue
        kwargs = {**model_kwargs, "stem": value}
        try:
            other = create(model, num_classes=getattr(net, "num_classes", None), **kwargs)
        except Exception:
            continue
        if tuple((getattr(other, "default_cfg", None) or {}).get("input_size", (0, 0, 0))[1:]) == side:
            return "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"
    return None


def run_folder(trainer) -> Path:
    """The run folder: the fit's (`SaveRunConfig.run_dir`), else RUN of a tested RUN/checkpoints/X.ckpt,
    else the checkpoint's folder, else the trainer's root folder."""
    for cb in trainer.callbacks:
        if getattr(cb, "run_dir", None):
            return Path(cb.run_dir)
    ckpt = getattr(trainer, "ckpt_path", None)
    if ckpt and Path(ckpt).is_file():
        ckpt = Path(ckpt)
        return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return Path(trainer.default_root_dir)


def write_test_report(folder: Path, confusion: torch.Tensor, class_names: list[str] | None,
                      metrics: dict[str, float]) -> None:
    """per_class_accuracy.csv, confusion_matrix.csv/.png and test_metrics.json in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    confusion = confusion.cpu().long()
    n = confusion.shape[0]
    names = list(class_names) if class_names and len(class_names) == n else [str(i) for i in range(n)]
    support, correct = confusion.sum(1), confusion.diag()
    with open(folder / "per_class_accuracy.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "images", "correct", "accuracy"])
        for i in range(n):
            acc = correct[i].item() / support[i].item() if support[i] else float("nan")
            w.writerow([i, names[i], support[i].item(), correct[i].item(), f"{acc:.6f}"])
    with open(folder / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for i in range(n):
            w.writerow([names[i], *confusion[i].tolist()])
    _plot_confusion(folder / "confusion_matrix.png", confusion, names)
    (folder / "test_metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    rank_zero_info(f"lightcnn: per-class accuracy and confusion matrix in {folder}")


def _plot_confusion(path: Path, confusion: torch.Tensor, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    rows = confusion.double() / confusion.sum(1, keepdim=True).clamp_min(1)  # each true class sums to 1
    size = min(4 + 0.3 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("test confusion matrix (rows normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
