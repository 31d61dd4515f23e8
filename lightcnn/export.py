"""Export a network to a file that runs without lightcnn:

    python -m lightcnn.export runs/lenet5_digits/20260101-120000 --format onnx --out lenet5.onnx
    python -m lightcnn.export RUN/checkpoints/last.ckpt --format pt2 --out lenet5.pt2
    python -m lightcnn.export resnet20 --format torchscript --out resnet20.pt    # a registered name: fresh weights

SOURCE is a run folder (its config.yaml and checkpoints/last.ckpt, else its newest checkpoint), a checkpoint
of a fit, or a registered model name. Formats: "pt2" (`torch.export`, load with `torch.export.load`),
"onnx" (`torch.onnx`, run with onnxruntime; needs `pip install "lightcnn[export]"`) and "torchscript"
(`torch.jit.trace`, load with `torch.jit.load`). The batch dimension stays dynamic.

By default the lightcnn kernels (LRN, fused BN-ReLU-conv, DenseNet's concatenation) are swapped for their
PyTorch references, which compute the same function, so the file needs torch (or onnxruntime) alone.
`--keep-kernels` keeps `torch.ops.lightcnn.*` in a pt2/TorchScript file: the consumer must then
`import lightcnn` (which registers the ops) before loading it. docs/export.md is the manual.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

FORMATS = ("pt2", "onnx", "torchscript")
SUFFIXES = {".pt2": "pt2", ".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}


class ExportError(ValueError):
    """A user error: one line saying what was wrong and what to do."""


# --- reading a run --------------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's contents, its checksum verified first (the one place that reads a checkpoint file)."""
    from lightcnn.training.checkpoint import load_checkpoint as load_verified  # Lightning only when a file is read

    return load_verified(path, map_location="cpu")


def _run_checkpoint(run: Path) -> Path:
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise ExportError(f"{run} holds no checkpoints/*.ckpt: give a run folder of `python -m lightcnn.fit`, "
                          "a checkpoint file, or a registered model name")
    last = run / "checkpoints" / "last.ckpt"
    return last if last.is_file() else ckpts[-1]


def _model_config(run: Path | None) -> dict:
    """The `model:` section of a run's saved config.yaml (empty without one)."""
    if run is None or not (run / "config.yaml").is_file():
        return {}
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text()) or {}
    section = cfg.get("model") or {}
    return section.get("init_args", section) if isinstance(section, dict) else {}


def load_model(source: str | Path, num_classes: int | None = None) -> nn.Module:
    """The network of a run folder, a checkpoint of a fit or a registered name (fresh weights), in eval mode."""
    from lightcnn.models import create

    path = Path(source)
    if path.is_dir():
        run, ckpt_path = path, _run_checkpoint(path)
    elif path.is_file():
        ckpt_path = path
        run = path.parent.parent if (path.parent.parent / "config.yaml").is_file() else None
    else:
        if any(ch in str(source) for ch in "/\\") or path.suffix in (".ckpt", ".pt", ".pth"):
            raise ExportError(f"{source} does not exist: give a run folder, a checkpoint file or a model name")
        model = create(str(source), num_classes=num_classes)
        return model.eval()
    ckpt = load_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in ckpt:
        raise ExportError(f"{ckpt_path} is no checkpoint of `python -m lightcnn.fit` (it has no hyper_parameters "
                          "and state_dict); export a run folder or its checkpoints/*.ckpt")
    config = {**hparams, **{k: v for k, v in _model_config(run).items() if v is not None}}
    kwargs = dict(config.get("model_kwargs") or {})
    for key in ("num_classes", "in_chans"):
        if hparams.get(key) is not None:  # linked from the data module at fit time: the checkpoint has it
            kwargs[key] = hparams[key]
    model = create(config["model"], **kwargs)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # a compiled net's keys
    model.load_state_dict(state)
    return model.eval()


# --- exporting -----------------------------------------------------------------------------------------


def use_reference_ops(model: nn.Module) -> int:
    """Switch every kernel-backed layer of `model` to its PyTorch reference (impl="reference"), which computes
    the same function with stock ops; returns how many layers it switched."""
    from lightcnn.layers._impl import LAYER_OPS

    count = 0
    for m in model.modules():
        if type(m).__name__ in LAYER_OPS or any(t.__name__ in LAYER_OPS for t in type(m).__mro__):
            m.impl = "reference"
            count += 1
    return count


def lightcnn_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The torch.ops.lightcnn.* ops an exported graph calls."""
    ops = set()
    for node in program.graph.nodes:
        name = getattr(node.target, "name", lambda: "")() if node.op == "call_function" else ""
        if name.startswith("lightcnn::"):
            ops.add(name.removeprefix("lightcnn::").split(".")[0])
    return sorted(ops)


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}: pip install \"lightcnn[export]\" "
                          "(onnx, onnxscript, onnxruntime)")


def export_model(model: nn.Module, fmt: str, out: str | Path, example: torch.Tensor,
                 keep_kernels: bool = False) -> list[str]:
    """Write `model` (eval mode) to `out` in `fmt` with a dynamic batch dimension, traced on `example`
    (batch >= 2). Returns the lightcnn ops the file needs (empty unless `keep_kernels`)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if keep_kernels and fmt == "onnx":
        raise ExportError("--keep-kernels works with pt2 and torchscript only: ONNX has no lightcnn ops, so an "
                          "ONNX file always uses the reference ops")
    if example.shape[0] < 2:
        raise ExportError("the example batch needs at least 2 images (a batch of 1 would fix the batch size)")
    model = copy.deepcopy(model).eval()  # the caller's model keeps its implementation choice
    if not keep_kernels:
        use_reference_ops(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        if fmt == "torchscript":
            # trace, not script: the models' signatures use postponed annotations (see docs/export.md)
            traced = torch.jit.trace(model, example, check_trace=False)
            traced.save(str(out))
            ops = sorted({n.kind().removeprefix("lightcnn::") for n in traced.inlined_graph.nodes()
                          if n.kind().startswith("lightcnn::")})
            return ops
        if fmt == "onnx":
            _require_onnx()
            torch.onnx.export(model, (example,), str(out), dynamo=True, dynamic_shapes=({0: batch},),
                              input_names=["input"], output_names=["logits"], external_data=False, verbose=False)
            return []
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(out))
        return lightcnn_ops(program)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lightcnn.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("source", help="a run folder, a checkpoint of a fit, or a registered model name")
    p.add_argument("--out", required=True, help="the file to write (.pt2, .onnx, .pt)")
    p.add_argument("--format", choices=FORMATS, help="default: from the suffix of --out")
    p.add_argument("--keep-kernels", action="store_true",
                   help="keep torch.ops.lightcnn.* (pt2, torchscript): the consumer must `import lightcnn`")
    p.add_argument("--input-size", type=int, help="side of the example input (default: the model's default_cfg)")
    p.add_argument("--num-classes", type=int, help="classes, for a model name (default: the paper's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fmt = args.format or SUFFIXES.get(Path(args.out).suffix)
        if fmt is None:
            raise ExportError(f"cannot tell the format from {args.out!r}: give --format {'|'.join(FORMATS)}")
        if fmt == "onnx":
            _require_onnx()
        model = load_model(args.source, args.num_classes)
        c, h, w = model.default_cfg["input_size"]
        if args.input_size:
            h = w = args.input_size
        example = torch.randn(2, c, h, w)
        ops = export_model(model, fmt, args.out, example, args.keep_kernels)
    except (ExportError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"lightcnn.export: {e}", file=sys.stderr)
        return 2
    print(f"lightcnn.export: wrote {args.out} ({fmt}, input (N, {c}, {h}, {w}), dynamic N)")
    if ops:
        print(f"lightcnn.export: the file calls torch.ops.lightcnn.{{{', '.join(ops)}}}: `import lightcnn` before "
              "loading it (drop --keep-kernels for a file that needs torch alone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
