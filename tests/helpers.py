"""Helpers shared by the test modules (no test module imports another), and the code that the tests' CLI
subprocesses load by class path (`tests.helpers.X`) or run (`python -m tests.helpers FAULT RUN_ROOT -- ...`).

- small models: one small member of every model family (`SMALL`, `FAST`, `small`) for real arithmetic;
- meta-device builds and counts (`build_meta`, `meta_model`, `n_params`, `macs`, `feature_sides`), under
  `MetaShapes`;
- the checks every test_models_<family>.py runs on its own models (`check_*`);
- data files in the real formats (`write_cifar`, `write_folder_tree`);
- recipes built through the CLI (`build_experiment`), or with another checkpoint (`recipe_with_checkpoint`);
- callbacks and faults for fit runs (`SaveRankWeights`, `SignalAtStep`, `BlowUpAfterStep`, `inject`).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from lightcnn.models import create

# experiments/wrn28_10.yaml is the headline command's short name for wrn28_10_cifar10.yaml (a link): listed once
EXPERIMENTS = sorted(p for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")
                     if not p.is_symlink())


# --- small models --------------------------------------------------------------------------------------------
# One small member of every model family, for the tests that run real arithmetic (model API, export):
# (registered name, keyword overrides that shrink it, input side). The overrides keep each family's blocks
# and stage layout; `FAST` is the subset the default suite runs, the others are marked slow where used.
SMALL: dict[str, tuple[dict, int]] = {
    "lenet5": ({}, 32),
    "lenet5_original": ({}, 32),
    "alexnet": (dict(hidden_features=32, num_classes=5), 67),
    "zfnet": (dict(hidden_features=32, num_classes=5), 67),
    "vgg11_bn": (dict(stages=((8,), (8,), (16,), (16,), (16,)), hidden_features=16, num_classes=5), 32),
    "resnet20": (dict(layers=(1, 1, 1)), 16),
    "resnet18": (dict(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), stem_width=8, num_classes=5), 64),
    "resnext29_8x64d": (dict(layers=(1, 1, 1), base_width=16, cardinality=2, widths=(8, 16, 16), stem_width=8), 16),
    "sd_resnet110": (dict(layers=(2, 2, 2)), 16),
    "preact_resnet164": (dict(layers=(1, 1, 1), widths=(4, 8, 8), stem_width=8), 16),
    "wrn16_2": (dict(layers=(1, 1, 1), drop_rate=0.3), 16),
    "densenet40_k12": (dict(block_config=(2, 2, 2)), 16),
    "densenet121": (dict(block_config=(1, 2, 2, 1), growth_rate=4, num_init_features=8, num_classes=5), 64),
    "fractalnet20": (dict(channels=(8, 8, 16), drop_rates=(0.0, 0.1, 0.2), input_size=16), 16),
    "googlenet": (dict(aux_logits=False, num_classes=5), 64),
    "inception_v4": (dict(num_blocks=(1, 1, 1), num_classes=5), 75),
    "inception_resnet_v1": (dict(num_blocks=(1, 1, 1), num_classes=5), 75),
    "nasnet_a_cifar": (dict(num_normal_cells=1, penultimate_filters=96, aux_head=False), 16),
    "nasnet_a_mobile": (dict(num_normal_cells=1, penultimate_filters=96, aux_head=False, num_classes=5,
                             image_size=64), 64),
}
# one per kernel-backed layer (LRN, BNReLUConv2d, DenseConv2d) and per way of building a network
FAST = ["lenet5", "alexnet", "vgg11_bn", "resnet18", "preact_resnet164", "densenet121"]


def small(name: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    """The small model (seeded, eval mode) and a batch of 2 random inputs for it."""
    overrides, side = SMALL[name]
    torch.manual_seed(0)
    model = create(name, **{**overrides, **extra}).eval()
    x = torch.randn(2, model.in_chans, side, side)
    return model, x


# --- meta-device builds and counts ---------------------------------------------------------------------------

def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_aten = torch.ops.aten
_BATCH_NORMS = {_aten.native_batch_norm.default, _aten._native_batch_norm_legit.default,
                _aten._native_batch_norm_legit.no_stats, _aten._native_batch_norm_legit_no_training.default}
_IN_PLACE = {_aten.normal_.default, _aten.uniform_.default, _aten.relu_.default}


class MetaShapes(TorchDispatchMode):
    """Meta-device arithmetic without the arithmetic, for the tests that read only shapes and counts.

    torch computes a meta batch norm, ReLU and random fill through their Python reference decompositions
    (means, variances, the normalisation), though a meta tensor holds no values: they are most of the time of
    a meta-device build and forward. Under this mode a batch norm of a meta tensor returns empty outputs of
    torch's shapes, dtypes and strides, a ReLU `empty_like` of its input, and an in-place ReLU or random fill
    its input; every other op, and every op on real tensors, runs as it is (`test_meta_shapes.py` compares it
    with torch's own meta kernels)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_meta:
            if func in _BATCH_NORMS:
                stats = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
                return torch.empty_like(x), x.new_empty(x.shape[1], dtype=stats), x.new_empty(x.shape[1], dtype=stats)
            if func is _aten.relu.default:
                return torch.empty_like(x)
            if func in _IN_PLACE:
                return x
        return func(*args, **(kwargs or {}))


def build_meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"), MetaShapes():
        return create(name, **kw)


def macs(model: nn.Module, side: int, device: str = "meta") -> int:
    """FlopCounterMode's FLOPs / 2 (convolutions and matmuls), eval mode, batch 1, on the meta device (a
    model without `in_chans`, torchvision's, takes 3 channels)."""
    model.eval()
    x = torch.zeros(1, getattr(model, "in_chans", 3), side, side, device=device)
    with torch.no_grad(), MetaShapes(), FlopCounterMode(display=False) as counter:  # no autograd: faster
        model(x)
    return counter.get_total_flops() // 2


@functools.cache
def meta_model(name: str) -> nn.Module:
    """One meta-device build per model in its default configuration, shared by every test module that only
    reads it (each test sets train/eval mode itself)."""
    return build_meta(name)


def has_kernel_layers(model: nn.Module) -> bool:
    """Whether the model holds a kernel-backed layer (LRN, the fused BN-ReLU-conv, DenseNet's op)."""
    from lightcnn.layers import BNReLUConv2d, LocalResponseNorm

    return any(isinstance(m, (LocalResponseNorm, BNReLUConv2d)) for m in model.modules())


def feature_sides(model: nn.Module, side: int, types=(nn.Conv2d, nn.MaxPool2d)) -> list[int]:
    sides = []
    hooks = [m.register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
             for m in model.modules() if isinstance(m, types)]
    with MetaShapes():
        model.eval()(torch.zeros(1, model.in_chans, side, side, device="meta"))
    for h in hooks:
        h.remove()
    return sides


def randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():  # so that a BN mapped onto the wrong layer, or left at its defaults, shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def bf16_autocast_error(model: nn.Module, x: torch.Tensor) -> float:
    """The relative error of the eval-mode logits under CPU bf16 autocast (checking that the features come out
    in bf16 and are finite), against float32; logits centred per sample."""
    model.eval()
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.forward_head(model.forward_features(x), pre_logits=True).dtype == torch.bfloat16
            y = model(x).float()
    assert torch.isfinite(y).all()
    centred = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
    return ((centred(y) - centred(expected)).norm() / centred(expected).norm()).item()


# --- model-family checks (the test_models_<family>.py files) ------------------------------------------------

def check_default_cfg(name: str, num_classes: int, dataset: str, side: int) -> None:
    """The registered model's cfg declares the paper's classes, data set and input side; num_classes overrides."""
    model = build_meta(name)
    cfg = model.default_cfg
    assert model.num_classes == cfg["num_classes"] == num_classes
    assert cfg["dataset"] == dataset
    assert cfg["input_size"] == (model.in_chans, side, side)
    assert len(cfg["mean"]) == len(cfg["std"]) == model.in_chans
    assert build_meta(name, num_classes=7).num_classes == 7


def check_published_counts(name: str, side: int) -> None:
    """Exact trainable parameters (aux heads included) and MACs within 1% of lightcnn/published.py, at `side`."""
    from lightcnn.published import published

    pub = published(name)
    assert pub.input_side == side
    model = build_meta(name)
    assert n_params(model) == pub.params + pub.aux_params
    assert macs(model, side) / 1e9 == pytest.approx(pub.gmacs, rel=0.01)


def check_forward_backward(name: str, num_classes: int, side: int | None = None) -> None:
    """Training-mode forward (every head) and backward at `side` x `side` (default: the native input size),
    batch 2: finite logits of the right shape and a finite gradient for every parameter."""
    model = create(name).train()
    c, h, w = model.default_cfg["input_size"]
    out = model(torch.randn(2, c, side or h, side or w))
    outs = list(out) if isinstance(out, tuple) else [out]
    for o in outs:
        assert o.shape == (2, num_classes) and torch.isfinite(o).all()
    sum(o.logsumexp(1).sum() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


def sides(small: int) -> list:
    """A family test's input sides: real forward and backward passes run at `small` in the fast suite, through
    the same modules (the native size's shapes are checked on the meta device for every model in
    test_model_api.py), and at the native size (None) in the slow suite."""
    return [small, pytest.param(None, marks=pytest.mark.slow, id="native")]


def check_eval_is_features_then_head(name: str, side: int) -> None:
    """Eval mode is deterministic and equals forward_head(forward_features(x))."""
    model = create(name).eval()
    x = torch.randn(2, model.in_chans, side, side)
    with torch.no_grad():
        y = model(x)
        assert torch.equal(y, model(x))
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), y)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)


@contextlib.contextmanager
def full_float32_precision():
    """Full float32 precision in cuDNN convolutions and matmuls (TF32 would need a looser tolerance)."""
    old = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old[0]
        torch.set_float32_matmul_precision(old[1])


def check_kernels_match_float64_reference(name: str, side: int, device: str, **kwargs) -> None:
    """float32 on `device` with the compiled kernels against float64 on the CPU with the reference ops, in
    eval mode; then a finite training step on `device`."""
    from lightcnn.layers import default_impl

    model = create(name, **kwargs)
    model.eval()
    x = torch.randn(1, model.in_chans, side, side)
    with full_float32_precision():
        with torch.no_grad(), default_impl("reference"):
            expected = model.double()(x.double())
        with torch.no_grad():
            y = model.float().to(device)(x.to(device))
        torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-4, atol=1e-5)
    model.train()
    y = model(x.to(device))
    (y.logits if isinstance(y, tuple) else y).logsumexp(1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def check_compiled_matches_eager(name: str, side: int, backend: str = "inductor", **kw) -> None:
    """torch.compile (`backend`) gives the eager outputs (every head) and parameter gradients, training mode."""
    model = create(name, **kw).train()
    x = torch.randn(2, model.in_chans, side, side)
    compiled = torch.compile(model, backend=backend)
    out_c, out_e = compiled(x), model(x)
    if isinstance(out_e, tuple):
        assert type(out_c) is type(out_e)
        out_c, out_e = torch.stack(list(out_c)), torch.stack(list(out_e))
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    grads_e = torch.autograd.grad(out_e.logsumexp(-1).sum(), list(model.parameters()))
    grads_c = torch.autograd.grad(out_c.logsumexp(-1).sum(), list(model.parameters()))
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=1e-3, atol=1e-4)


def check_torchvision_weights_give_equal_outputs(name: str) -> None:
    """A randomised torchvision twin (10 classes) converted to ours gives bit-equal eval outputs."""
    import torchvision

    from lightcnn.models.weights import from_torchvision

    tv = getattr(torchvision.models, name.replace("_owt", ""))(weights=None, num_classes=10)
    randomise_bn(tv)
    ours = from_torchvision(name, tv)
    assert ours.num_classes == 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv.eval()(x), rtol=0, atol=0)


def check_torchvision_state_dict_maps_key_for_key(name: str) -> None:
    """The torchvision twin's state_dict maps onto ours key for key, shape for shape (meta device)."""
    import torchvision

    from lightcnn.models.weights import TWINS, map_layers_in_order

    assert ("torchvision", name) in TWINS
    with torch.device("meta"):
        tv = getattr(torchvision.models, name.replace("_owt", ""))(weights=None)
        ours = create(name)
    converted = map_layers_in_order(ours, tv.state_dict())
    assert list(converted) == list(ours.state_dict())
    assert [v.shape for v in converted.values()] == [v.shape for v in tv.state_dict().values()]
    assert [v.shape for v in converted.values()] == [v.shape for v in ours.state_dict().values()]


# --- data files in the real formats ---------------------------------------------------------------------------

def write_cifar(root, hundred: bool, n_train: int = 12, n_test: int = 6, seed: int = 0):
    """A small CIFAR in the official python format: pickled dicts of uint8 rows (3 x 32 x 32, CHW)."""
    rng = np.random.default_rng(seed)
    label_key, folder = ("fine_labels", "cifar-100-python") if hundred else ("labels", "cifar-10-batches-py")
    classes = 100 if hundred else 10
    d = root / folder
    d.mkdir(parents=True)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: rng.integers(0, classes, n).tolist()}

    files = {"train": batch(n_train), "test": batch(n_test)} if hundred else {
        **{f"data_batch_{i}": batch(n_train // 5 + (i == 1) * (n_train % 5)) for i in range(1, 6)},
        "test_batch": batch(n_test)}
    for name, content in files.items():
        with open(d / name, "wb") as f:
            pickle.dump(content, f)
    meta = ({"fine_label_names": [f"c{i}" for i in range(100)]} if hundred
            else {"label_names": [f"c{i}" for i in range(10)]})
    with open(d / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return files


def write_folder_tree(root, classes=("n01", "n02", "n03"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
                img.save(root / split / c / f"{j}.{'JPEG' if j % 2 else 'png'}")


# --- recipes --------------------------------------------------------------------------------------------------

def build_experiment(name: str, tmp_path, weights: bool = False):
    """The module and datamodule of `experiments/<name>.yaml`, built through the CLI (no logger, no training).
    Without `weights` the network is built on the meta device: the recipe's objects as configured, no weights
    drawn (a network's real build and forward are its family's tests)."""
    from lightcnn.training import module as module_file
    from lightcnn.training.cli import LightCNNCLI

    path = next(p for p in EXPERIMENTS if p.stem == name)
    with pytest.MonkeyPatch.context() as mp:
        if not weights:
            mp.setattr(module_file, "create", build_meta)
        return LightCNNCLI(["--config", str(path), "--run_root", str(tmp_path), "--trainer.logger", "false"],
                           stage="fit", experiment_name=name)


def recipe_with_checkpoint(recipe: Path, out: Path, init_args: str) -> Path:
    """`recipe` (one without callbacks of its own) written to `out` with one `ModelCheckpoint(**init_args)`
    (a YAML flow mapping) in place of the last-checkpoint callback every recipe inherits."""
    text = recipe.read_text()
    assert "\ntrainer:\n" in text and "callbacks" not in text, recipe
    out.write_text(text.replace("\ntrainer:\n", "\ntrainer:\n  callbacks:\n    - class_path: "
                                "lightning.pytorch.callbacks.ModelCheckpoint\n      init_args: " + init_args + "\n", 1))
    return out


# --- callbacks and faults for fit runs ------------------------------------------------------------------------


class SaveRankWeights(L.Callback):
    """At the end of fit, every process saves its own copy of the parameters as `dirpath/rank{R}.pt`."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        torch.save({"params": params, "global_step": trainer.global_step, "world_size": trainer.world_size},
                   Path(self.dirpath) / f"rank{trainer.global_rank}.pt")


# Faults injected into the CLI's own process by tests/test_reliability.py (`python -m tests.helpers` runs them
# first). Each strikes while the bytes of a checkpoint go to disk, wherever the saver sends them: through
# `os.sendfile`/`shutil.copyfileobj` (a copy from $TMPDIR over the target, Lightning's own save across
# filesystems) or before `os.fsync` (a write of a file that is then flushed).

def inject(fault, armed) -> None:
    """Call `fault()` in the middle of the next checkpoint write once `armed()` is true."""
    real_sendfile, real_copyfileobj, real_fsync = os.sendfile, shutil.copyfileobj, os.fsync

    def sendfile(out_fd, in_fd, offset, count):
        if armed():
            real_sendfile(out_fd, in_fd, offset, max(1, count // 2048))  # part of the bytes, then the fault
            fault()
        return real_sendfile(out_fd, in_fd, offset, count)

    def copyfileobj(fsrc, fdst, length=0):
        if armed():
            fdst.write(fsrc.read(100))
            fdst.flush()
            fault()
        return real_copyfileobj(fsrc, fdst, length) if length else real_copyfileobj(fsrc, fdst)

    def fsync(fd):
        if armed():
            fault()
        return real_fsync(fd)

    os.sendfile, shutil.copyfileobj, os.fsync = sendfile, copyfileobj, fsync


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def no_space() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def second_save(run_root: str):
    """True once a `last.ckpt` exists under run_root (the first save is done)."""
    return lambda: any(Path(run_root).glob("*/*/checkpoints/last.ckpt"))


class SignalAtStep(L.Callback):
    """Send `signum` to this process after training step `step` (global) of rank `rank`."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), rank: int = 0, pid_file: str | None = None):
        self.step, self.signum, self.rank, self.pid_file = step, signum, rank, pid_file

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.pid_file:  # tells the test which process it is and that the signal is on its way
                Path(self.pid_file).write_text(str(os.getpid()))
            os.kill(os.getpid(), self.signum)


class BlowUpAfterStep(L.Callback):
    """Set every weight to NaN after training step `step`: a run diverging at a known point."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            for p in pl_module.parameters():
                p.data.fill_(float("nan"))


if __name__ == "__main__":  # python -m tests.helpers FAULT RUN_ROOT -- fit arguments
    fault, run_root = sys.argv[1], sys.argv[2]
    inject({"kill": kill, "no_space": no_space}[fault], second_save(run_root))
    from lightcnn.training.cli import main

    main(sys.argv[4:], stage="fit")
