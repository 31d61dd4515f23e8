"""Classify image files with a trained run: the top-k class names and probabilities of each image.

    python -m lightcnn.predict runs/flowers/20260101-120000 photos/ cat.jpg --out predictions.csv
    python -m lightcnn.predict runs/flowers/20260101-120000/checkpoints/last.ckpt img.png --top_k 3

RUN_OR_CHECKPOINT is a run folder (its `checkpoints/last.ckpt`, else its newest checkpoint) or a checkpoint
file. Folders are searched recursively for image files. Each image is read the way the run's evaluation
read its data: converted to the run's channels, resized (shorter side to the run's `resize_size`, then a
centre crop, for folder data; straight to the image size otherwise) and normalised with the run's
mean/std, all saved in the checkpoint by `ClassifierModule`. The class names are the run's (its image
folders' names), else the class indices.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from lightcnn.training.checkpoint import verify_checkpoint

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file, or the one a run folder's `checkpoints/` offers (last.ckpt, else the newest)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a run folder nor a checkpoint file")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint (*.ckpt) in {folder}")
    return found[-1]


def _module_class(ckpt: Path):
    """The LightningModule class of the run (a subclass named in its config.yaml), else ClassifierModule."""
    import importlib

    import yaml

    from lightcnn.training.module import ClassifierModule

    config = ckpt.parent.parent / "config.yaml"
    if ckpt.parent.name == "checkpoints" and config.is_file():
        model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        if isinstance(model, dict) and "class_path" in model:
            module, _, name = model["class_path"].rpartition(".")
            return getattr(importlib.import_module(module), name)
    return ClassifierModule


def load_run(path: str | Path, device: str = "cpu"):
    """(module in eval mode, its evaluation facts, class names) of a run folder or checkpoint."""
    ckpt = find_checkpoint(Path(path))
    verify_checkpoint(ckpt)
    module = _module_class(ckpt).load_from_checkpoint(ckpt, map_location=device)
    module.eval()
    facts: dict[str, Any] = dict(getattr(module, "eval_config", None) or {})
    cfg = getattr(module.net, "default_cfg", None) or {}
    if "image_size" not in facts and "input_size" in cfg:
        facts["image_size"] = list(cfg["input_size"][1:])
    facts.setdefault("in_chans", getattr(module.net, "in_chans", 3))
    for key in ("mean", "std"):
        if key not in facts and key in cfg:
            facts[key] = list(cfg[key])
    names = module.class_names or [str(i) for i in range(module.num_classes)]
    return module, facts, names


def eval_transform(facts: dict[str, Any]) -> v2.Compose:
    """The run's evaluation transform of a PIL image (see the module docstring)."""
    size = facts.get("image_size")
    if size is None:
        raise ValueError("the checkpoint does not say which image size the network was trained on")
    hw = [size, size] if isinstance(size, int) else list(size)
    resize = facts.get("resize_size")
    ops = [v2.Resize(resize), v2.CenterCrop(hw)] if resize else [v2.Resize(hw)]
    norm = [v2.Normalize(facts["mean"], facts["std"])] if facts.get("mean") and facts.get("std") else []
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True), *norm])


def image_files(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {' '.join(inputs)}")
    return files


def predict(run: str | Path, inputs: list[str], top_k: int = 5, batch_size: int = 32,
            device: str = "cpu") -> list[dict[str, Any]]:
    """One row per image: `image`, then `class_i`, `prob_i` for i = 1..top_k (most probable first)."""
    from PIL import Image, UnidentifiedImageError

    module, facts, names = load_run(run, device)
    transform, mode = eval_transform(facts), "L" if facts["in_chans"] == 1 else "RGB"
    k = min(top_k, len(names))
    files, rows = image_files(inputs), []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = []
        for f in chunk:
            try:
                with Image.open(f) as im:
                    images.append(transform(im.convert(mode)))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot read {f} as an image ({e})") from e
        with torch.no_grad():
            probs = module(torch.stack(images).to(device)).float().softmax(-1)
        p, idx = probs.topk(k, dim=-1)
        for f, pi, ii in zip(chunk, p.tolist(), idx.tolist()):
            row: dict[str, Any] = {"image": str(f)}
            for rank, (prob, i) in enumerate(zip(pi, ii), 1):
                row[f"class_{rank}"], row[f"prob_{rank}"] = names[i], round(prob, 6)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m lightcnn.predict", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run folder (RUN_ROOT/NAME/TIMESTAMP) or checkpoint file")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    parser.add_argument("--top_k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top_k must be >= 1")
    try:
        rows = predict(args.run, args.images, args.top_k, args.batch_size, args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"lightcnn.predict: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"lightcnn.predict: {len(rows)} images -> {args.out}")
    return rows


if __name__ == "__main__":
    main()
