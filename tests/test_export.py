"""`python -m lightcnn.export`: every family's file (torch.export .pt2, ONNX, TorchScript trace) loads in a
fresh process where lightcnn cannot be imported, runs with torch (onnxruntime for ONNX) alone and equals the
eager network within 1e-4 of the logits' scale (`TOL`), at the traced batch size (2) and at 3 and 1 (dynamic
batch). The files of several models are checked by one subprocess (each start costs seconds). The CLI reads run
folders, checkpoints and names; `--keep-kernels` files need `import lightcnn`, which registers the ops."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from lightcnn import export
from lightcnn.layers._impl import LAYER_OPS
from lightcnn.models import create
from lightcnn.ops import library_loaded
from tests.helpers import SMALL, small

ROOT = Path(__file__).resolve().parents[1]

# The default suite: one small network per format, together running every kernel-backed layer's reference path
# (densenet121: the fused BN-ReLU-conv and DenseNet's concatenation; alexnet: LRN), built on the kernels so the
# export must swap them. The slow suite exports every other (family, format) pair.
FORMATS = ["pt2", "onnx", "torchscript"]
FAST_CASES = [("densenet121", "pt2"), ("alexnet", "onnx"), ("alexnet", "torchscript")]
SUFFIX = {"pt2": ".pt2", "onnx": ".onnx", "torchscript": ".pt"}

# The files must compute the eager function: max |file - eager| < TOL * max(1, max |eager logits|), the same rule for
# every family and format. Float32 rounds each logit to its own magnitude: on the small NASNet-A Mobile the
# logits reach 2650 (one float32 step there is 2.4e-4), and onnxruntime, eager float32 and eager float64 differ by
# a few of those steps (onnxruntime vs eager 9.8e-4, eager float32 vs float64 9.7e-4, onnxruntime vs float64
# 7.6e-4; NASNet-A CIFAR, logits up to 327: 1.2e-4, 8.4e-5, 7.0e-5), so an absolute 1e-4 would test the rounding
# of large numbers, not the export. For logits of magnitude <= 1 the rule is the absolute 1e-4.
TOL = 1e-4


def scaled_errors(errors: list[float], ys: list[torch.Tensor]) -> list[float]:
    """Each max |file - eager| divided by the scale of the eager logits, max(1, max |y|)."""
    return [e / max(1.0, float(y.abs().max())) for e, y in zip(errors, ys)]


# Runs in a fresh interpreter where `import lightcnn` fails: loads every file, returns the max |error|; given a
# second file, then imports lightcnn and runs the --keep-kernels files.
RUNNER = textwrap.dedent("""
    import json, sys
    sys.modules["lightcnn"] = None  # lightcnn must not be importable here
    try:
        import lightcnn  # noqa: F401
        sys.exit("lightcnn is importable")
    except ImportError:
        pass
    import torch
    import onnxruntime

    def load(fmt, path):
        if fmt == "pt2":
            return torch.export.load(path).module()
        if fmt == "torchscript":
            return torch.jit.load(path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    cases = torch.load(sys.argv[1])
    errors = {}
    for name, case in cases.items():
        for fmt, path in case["files"].items():
            run = load(fmt, path)
            with torch.no_grad():
                errors[f"{name}/{fmt}"] = [float((run(x) - y).abs().max()) for x, y in zip(case["x"], case["y"])]
    result = {"errors": errors}
    if len(sys.argv) > 2:  # then `import lightcnn` alone, and the --keep-kernels files that call its ops
        ops = lambda: sorted(n for n in dir(torch.ops.lightcnn) if not n.startswith("_"))
        before = ops()
        del sys.modules["lightcnn"]
        import lightcnn  # noqa: F401
        kept = torch.load(sys.argv[2])
        with torch.no_grad():
            result["keep_kernels"] = dict(
                ops_before=before, ops=ops(), models_imported="lightcnn.models" in sys.modules,
                errors=[float((load(fmt, path)(kept["x"]) - kept["y"]).abs().max())
                        for fmt, path in kept["files"].items()])
    print(json.dumps(result))
""")


def _export_and_run(cases_: list[tuple[str, str]], folder: Path, impl: str | None = None, keep_kernels: bool = False
                    ) -> tuple[dict[str, list[float]], dict[str, torch.nn.Module], dict | None]:
    """Exports each (network, format) case, runs every file in one fresh process; ({"name/format": scaled errors
    at the three batch sizes}, {name: the eager network}, the `--keep-kernels` result or None). `impl` is given to
    every network when not None. With `keep_kernels`, the small AlexNet is also exported as a .pt2 and a
    TorchScript trace that call torch.ops.lightcnn.lrn, which the same process loads after `import lightcnn`."""
    cases, nets = {}, {}
    for name in dict.fromkeys(n for n, _ in cases_):
        model, x = small(name, **({} if impl is None else {"impl": impl}))
        others = [torch.randn(3, *x.shape[1:]), x[:1]]  # other batch sizes: the batch dimension is dynamic
        with torch.no_grad():
            y = [model(v) for v in [x, *others]]  # eager, with the network's own implementation
        files = {}
        for fmt in [f for n, f in cases_ if n == name]:
            files[fmt] = str(folder / f"{name}{SUFFIX[fmt]}")
            assert export.export_model(model, fmt, files[fmt], x) == []
        cases[name], nets[name] = dict(files=files, x=[x, *others], y=y), model
    torch.save(cases, folder / "cases.pt")
    argv = [sys.executable, str(folder / "runner.py"), str(folder / "cases.pt")]
    if keep_kernels:
        model, x = small("alexnet", impl="kernel")
        kept = {fmt: str(folder / f"alexnet_kept{SUFFIX[fmt]}") for fmt in ("pt2", "torchscript")}
        for fmt, path in kept.items():
            assert export.export_model(model, fmt, path, x, keep_kernels=True) == ["lrn"]
        with torch.no_grad():
            torch.save(dict(files=kept, x=x, y=model(x)), folder / "kept.pt")
        argv.append(str(folder / "kept.pt"))
    (folder / "runner.py").write_text(RUNNER)
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = {key: scaled_errors(e, cases[key.split("/")[0]]["y"]) for key, e in result["errors"].items()}
    return errors, nets, result.get("keep_kernels")


@pytest.fixture(scope="module")
def fast_export(tmp_path_factory) -> tuple[dict[str, list[float]], dict[str, torch.nn.Module], Path]:
    """The default suite's files, exported once for every test of this module and run in one fresh process:
    (errors, networks, the --keep-kernels result, folder)."""
    folder = tmp_path_factory.mktemp("export")
    kernels = library_loaded()
    return *_export_and_run(FAST_CASES, folder, impl="kernel" if kernels else None, keep_kernels=kernels), folder


@pytest.mark.parametrize("name, fmt", FAST_CASES)
def test_exported_file_runs_without_lightcnn_and_equals_eager(fast_export, name, fmt):
    errors = fast_export[0][f"{name}/{fmt}"]
    assert len(errors) == 3 and max(errors) < TOL, errors


@pytest.mark.slow
def test_every_family_exports(tmp_path):
    cases = [(n, f) for n in SMALL for f in FORMATS if (n, f) not in FAST_CASES]
    errors, _, _ = _export_and_run(cases, tmp_path)
    assert len(errors) == len(cases) == len(SMALL) * len(FORMATS) - len(FAST_CASES)
    bad = {k: v for k, v in errors.items() if max(v) >= TOL}
    assert not bad, bad


@pytest.mark.skipif(not library_loaded(), reason="needs the compiled lightcnn._C")
def test_export_swaps_kernels_for_reference_ops_and_leaves_the_model_alone(fast_export):
    _, nets, _, folder = fast_export
    assert export.lightcnn_ops(torch.export.load(str(folder / "densenet121.pt2"))) == []  # no torch.ops.lightcnn.*
    impls = {m.impl for m in nets["densenet121"].modules() if type(m).__name__ in LAYER_OPS}  # kernel-backed
    assert impls == {"kernel"}


def _fake_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run folder as `python -m lightcnn.fit` leaves it: config.yaml and checkpoints/last.ckpt whose
    hyper_parameters hold the model name, its overrides and the class count linked from the data."""
    torch.manual_seed(3)
    net = create("lenet5", num_classes=7).eval()
    run = tmp_path / "runs" / "lenet5_digits" / "20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"model": "lenet5", "model_kwargs": None}}))
    hparams = {"model": "lenet5", "model_kwargs": None, "num_classes": 7, "in_chans": 1}
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams},
               run / "checkpoints" / "last.ckpt")
    return run, net


@pytest.mark.parametrize("source", ["run", "checkpoint"])
def test_cli_exports_a_run_folder_or_checkpoint_with_its_weights(tmp_path, capsys, source):
    run, net = _fake_run(tmp_path)
    out = tmp_path / "lenet5.pt2"
    src = run if source == "run" else run / "checkpoints" / "last.ckpt"
    assert export.main([str(src), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), net(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["no_such_net", "--out", "x.pt2"], "Unknown model 'no_such_net'"),
    (["runs/nothing/here", "--out", "x.pt2"], "does not exist"),
    (["lenet5", "--out", "x.bin"], "cannot tell the format"),
    (["lenet5", "--out", "x.onnx", "--keep-kernels"], "ONNX has no lightcnn ops"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_onnx_without_the_extra_names_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else find_spec(n, *a))
    assert export.main(["lenet5", "--out", str(tmp_path / "x.onnx")]) == 2
    assert 'pip install "lightcnn[export]"' in capsys.readouterr().err


@pytest.mark.skipif(not library_loaded(), reason="needs the compiled lightcnn._C")
def test_import_lightcnn_registers_the_ops_and_keep_kernels_files_load_after_it(fast_export):
    """In the fresh process of the files above, `import lightcnn` alone (not lightcnn.models) registers the
    three ops, and a .pt2 and a TorchScript trace that call torch.ops.lightcnn.lrn load after it and give the
    eager network's logits."""
    kept, ops = fast_export[2], {"lrn", "bn_relu_conv2d", "dense_bn_relu_conv2d"}
    assert not ops & set(kept["ops_before"]) and not kept["models_imported"]
    assert ops <= set(kept["ops"])
    assert len(kept["errors"]) == 2 and max(kept["errors"]) < 1e-5, kept["errors"]
