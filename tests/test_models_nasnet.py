"""NASNet-A (6 @ 768 CIFAR, 4 @ 1056 Mobile, 6 @ 4032 Large): counts, cells, auxiliary head, ScheduledDropPath
and its callback, TF "SAME" pooling, timm weight import, FLOP counter, torch.compile and bf16 autocast.

Counts and shapes are taken on the meta device; the rest runs real tensors on the CPU. Expected numbers
come from `lightcnn.published`. Run with `python -m pytest tests/test_models_nasnet.py -q` (`-m slow` for
the heavy twins: Large at 331 on real tensors, inductor compile).
"""
from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from torch import nn

from lightcnn.data.synthetic import SyntheticDataModule
from lightcnn.models import create, list_models
from lightcnn.models.nasnet import (
    NORMAL_CELL,
    REDUCTION_CELL,
    DropPath,
    NASNet,
    NASNetOutputs,
    PoolSame,
    convert_timm_state_dict,
    nasnet_from_timm,
)
from lightcnn.models.weights import from_timm, twins
from lightcnn.published import published
from lightcnn.training import ClassifierModule, ScheduledDropPath
from tests.helpers import MetaShapes, build_meta, macs, n_params

NASNETS = ["nasnet_a_cifar", "nasnet_a_large", "nasnet_a_mobile"]
# (N, F, stem filters, keep prob) of the released configs: cifar_config, mobile/large_imagenet_config.
RELEASED = {"nasnet_a_cifar": (6, 32, 96, 0.6), "nasnet_a_mobile": (4, 44, 32, 1.0),
            "nasnet_a_large": (6, 168, 96, 0.7)}
TINY = dict(num_normal_cells=1, penultimate_filters=96)  # F = 4: a 5-cell CIFAR net for the slow machinery


def drop_paths(cell: nn.Module) -> list[DropPath]:
    return [m for m in cell.modules() if isinstance(m, DropPath)]


# ------------------------------------------------------------------------------------ registry and counts

def test_the_three_nasnets_are_registered_with_their_papers_input():
    assert list_models("nasnet*") == NASNETS
    for name in NASNETS:
        model = build_meta(name)
        side, classes = published(name).input_side, 10 if name == "nasnet_a_cifar" else 1000
        assert model.default_cfg["input_size"] == (3, side, side)
        assert model.num_classes == classes and model.fc.out_features == classes
        assert model.default_cfg["dataset"] == ("cifar10" if classes == 10 else "imagenet")


@pytest.mark.parametrize("name", NASNETS)
def test_params_exact_and_macs_within_1pct_of_published(name):
    ref = published(name)
    without_aux = build_meta(name, aux_head=False)
    assert n_params(without_aux) == ref.params
    assert n_params(build_meta(name)) - ref.params == ref.aux_params
    assert macs(without_aux, ref.input_side) / 1e9 == pytest.approx(ref.gmacs, rel=0.01)


def test_cifar_first_cell_reads_the_stem_output_untouched_as_released():
    """TF-slim's first CIFAR cell gets h-1 = None and uses the stem output itself (96 maps) as h-1, so its
    operations on h-1 read 96 channels and the unused h-1 needs a 1x1 before the concatenation. Counted here
    from the released cell, against the wiring that maps the stem output to F = 32 first."""
    S, F_, side = 96, 32, 32
    conv = lambda cin, cout, k=1: cin * cout * k * k
    sep = lambda cin, k: conv(cin, 1, k) + conv(cin, F_)  # the first layer of a stacked separable: dw + pw
    # Ops of the normal cell on h-1 (state 1) whose size depends on h-1's width: sep3, sep5, sep3 ...
    released = sep(S, 3) + sep(S, 5) + sep(S, 3)
    released += conv(S, F_) + 3 * (conv(S, F_))  # "none" -> 1x1; two avg pools -> 1x1 each; h-1 into the concat
    variant = conv(S, F_)  # the variant's ReLU-1x1-BN on h-1 ...
    variant += sep(F_, 3) + sep(F_, 5) + sep(F_, 3)  # ... after which the ops read F channels and need no 1x1
    bn = 2 * F_
    param_gap = released - variant + 4 * bn - bn
    as_released = build_meta("nasnet_a_cifar", aux_head=False, first_cell_prev="released")
    wired = build_meta("nasnet_a_cifar", aux_head=False, first_cell_prev="relu_conv_bn")
    assert n_params(as_released) - n_params(wired) == param_gap == 18_304
    # the default is the released wiring, and its counts are the published ones
    assert n_params(build_meta("nasnet_a_cifar", aux_head=False)) == n_params(as_released) == 3_346_538
    assert n_params(wired) == 3_328_234
    assert macs(as_released, side) - macs(wired, side) == (released - variant) * side * side
    assert sum(NORMAL_CELL.hiddenstate_indices[i] == 1 for i in range(10)) == 6  # the six ops on h-1 counted above


def test_flop_counter_counts_the_same_on_real_tensors_as_on_meta():
    model = create("nasnet_a_cifar", aux_head=False)
    with torch.no_grad():
        assert macs(model, 32, device="cpu") == macs(build_meta("nasnet_a_cifar", aux_head=False), 32)


@pytest.mark.parametrize("name", NASNETS)
def test_cells_widths_and_maps_follow_the_released_configs(name):
    N, F_, stem, _ = RELEASED[name]
    model = build_meta(name)
    imagenet = name != "nasnet_a_cifar"
    names = list(model.cells)
    expected = ([f"cell_stem_{i}" for i in range(2)] if imagenet else []) + [f"cell_{i}" for i in range(N)] + [
        "reduction_cell_0"] + [f"cell_{i}" for i in range(N, 2 * N)] + ["reduction_cell_1"] + [
        f"cell_{i}" for i in range(2 * N, 3 * N)]
    assert names == expected
    assert model.stem.conv.out_channels == stem
    widths = {n: c.out_channels for n, c in model.cells.items()}
    for stack in range(3):
        assert widths[f"cell_{stack * N}"] == 6 * F_ * 2 ** stack  # normal cells: h-1 + five blocks of F
    assert widths["reduction_cell_0"] == 4 * 2 * F_ and widths["reduction_cell_1"] == 4 * 4 * F_
    if imagenet:
        assert widths["cell_stem_0"] == 4 * F_ // 4 and widths["cell_stem_1"] == 4 * F_ // 2
    side = published(name).input_side
    x = torch.zeros(1, 3, side, side, device="meta")
    feats = model.eval().forward_features(x)
    # 32 -> 8 on CIFAR; 331 -> 165 (VALID 3x3/2) -> 83 -> 42 -> 21 -> 11 and 224 -> 111 -> 56 -> 28 -> 14 -> 7
    out_side = side // 4 if not imagenet else math.ceil(((side - 3) // 2 + 1) / 16)
    assert feats.shape == (1, 24 * F_, out_side, out_side)


# ----------------------------------------------------------------------------- forward/backward, aux head

def _forward_backward(model: nn.Module, side: int, device: str = "cpu") -> None:
    model.train()
    model.set_drop_path_progress(1.0)  # the heaviest dropping, as at the end of training
    out = model(torch.randn(2, 3, side, side, device=device))
    assert isinstance(out, NASNetOutputs)
    assert out.logits.shape == out.aux_logits.shape == (2, model.num_classes)
    (out.logits.logsumexp(1).sum() + 0.4 * out.aux_logits.logsumexp(1).sum()).backward()
    if device != "meta":
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["nasnet_a_cifar", "nasnet_a_mobile"])
def test_forward_backward_at_native_size(name):
    _forward_backward(create(name), published(name).input_side)


def test_large_forward_backward_at_331_on_meta():
    with MetaShapes():
        _forward_backward(build_meta("nasnet_a_large"), 331, device="meta")


@pytest.mark.slow
def test_large_forward_backward_at_331():
    _forward_backward(create("nasnet_a_large"), 331)


def test_aux_head_only_in_training_and_eval_deterministic():
    model = create("nasnet_a_cifar")
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(model.train()(x), NASNetOutputs)
    model.set_drop_path_progress(1.0)
    model.eval()
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert isinstance(y1, torch.Tensor) and y1.shape == (2, 10)
    assert torch.equal(y1, y2)
    model.set_drop_path_progress(0.0)
    with torch.no_grad():
        assert torch.equal(model(x), y1)  # eval ignores the schedule
    no_aux = create("nasnet_a_cifar", aux_head=False).train()
    assert no_aux.aux is None and isinstance(no_aux(x), torch.Tensor)


def test_aux_head_sits_on_the_last_normal_cell_before_the_second_reduction():
    for name, (N, F_, _, _) in RELEASED.items():
        model = build_meta(name)
        assert model._aux_after == f"cell_{2 * N - 1}"
        assert model.aux.proj.in_channels == 12 * F_  # a normal cell of the middle stack
    # the 768-filter convolution covers the whole map left by the 5x5/3 pool: 16 -> 4, 14 -> 4, 21 -> 6
    assert [build_meta(n).aux.conv.kernel_size for n in NASNETS] == [(4, 4), (6, 6), (4, 4)]


def test_aux_head_on_another_input_size_is_a_clear_error():
    model = create("nasnet_a_cifar", **TINY).train()
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(2, 3, 64, 64))
    assert isinstance(create("nasnet_a_cifar", image_size=64, **TINY).train()(torch.randn(2, 3, 64, 64)),
                      NASNetOutputs)
    with pytest.raises(ValueError, match="aux_head=False"):
        create("nasnet_a_cifar", image_size=8, **TINY)


def test_bad_knobs_are_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        create("nasnet_a_cifar", penultimate_filters=100)
    with pytest.raises(ValueError, match="drop_path_keep_prob"):
        create("nasnet_a_cifar", drop_path_keep_prob=0.0)
    with pytest.raises(TypeError, match="stem"):
        create("nasnet_a_cifar", stem="mnist")
    with pytest.raises(ValueError, match="stem must be"):
        NASNet(stem="mnist")
    with pytest.raises(ValueError, match="fraction"):
        create("nasnet_a_cifar", **TINY).set_drop_path_progress(-0.1)


# ------------------------------------------------------------------------------------ ScheduledDropPath

@pytest.mark.parametrize("name", NASNETS)
def test_drop_probability_scales_with_cell_depth_and_progress_as_released(name):
    N, _, _, keep = RELEASED[name]
    model = build_meta(name).to_empty(device="cpu")  # storage without the (slow) initialisation
    total = 3 * N + 2 + (2 if name != "nasnet_a_cifar" else 0)  # normal + reduction (+ stem) cells
    assert len(model.cells) == total
    if keep == 1.0:  # Mobile trains without drop-path
        assert not any(isinstance(m, DropPath) for m in model.modules())
        return
    for depth, (cell_name, cell) in enumerate(model.cells.items()):
        paths = drop_paths(cell)
        ops = REDUCTION_CELL.operations if "reduction" in cell_name or "stem" in cell_name else NORMAL_CELL.operations
        assert len(paths) == sum(op != "none" for op in ops)  # every operation but the identity
        assert all(p.max_drop_prob == pytest.approx((depth + 1) / total * (1 - keep)) for p in paths)
    for fraction in (0.0, 0.25, 1.0, 3.0):
        model.set_drop_path_progress(fraction)
        for depth, cell in enumerate(model.cells.values()):
            expected = min(fraction, 1.0) * (depth + 1) / total * (1 - keep)
            assert all(p.drop_prob.item() == pytest.approx(expected) for p in drop_paths(cell))
    assert model.drop_path_progress == 1.0


def test_drop_path_drops_whole_examples_and_rescales_the_kept():
    path = DropPath(0.5)
    path.drop_prob.fill_(0.3)
    x = torch.ones(20_000, 2, 3, 3)
    y = path.train()(x)
    per_example = y.flatten(1)
    kept = per_example[:, 0] != 0
    assert ((per_example == 0).all(1) | (per_example == 1 / 0.7).all(1)).all()  # whole examples, scaled 1/keep
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.015)  # 4.5 sigma of a binomial(20000, 0.7)
    assert torch.equal(path.eval()(x), x)


def test_drop_path_is_on_only_in_training():
    model = create("nasnet_a_cifar", **TINY)
    x = torch.randn(4, 3, 32, 32)
    model.train().set_drop_path_progress(0.0)
    torch.manual_seed(1)
    a = model(x).logits
    torch.manual_seed(2)
    assert torch.equal(model(x).logits, a)  # with progress 0 training is deterministic: nothing is dropped
    model.set_drop_path_progress(1.0)
    assert not torch.allclose(model(x).logits, a)  # TINY's last cell drops with p = 5/5 * 0.4
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


class _Record(L.Callback):
    def __init__(self):
        self.progress, self.drop = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.progress.append(pl_module.net.drop_path_progress)
        self.drop.append(drop_paths(list(pl_module.net.cells.values())[-1])[0].drop_prob.item())


def _fit(callback: ScheduledDropPath, model: str = "nasnet_a_cifar", **trainer_kw) -> _Record:
    record = _Record()
    kw = TINY if model == "nasnet_a_cifar" else {}
    module = ClassifierModule(model, lambda p: torch.optim.SGD(p, lr=0.01), model_kwargs=kw, num_classes=10,
                              in_chans=3, aux_loss_weights=0.4)
    data = SyntheticDataModule(num_classes=10, in_chans=3, image_size=32, num_samples=8, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[callback, record], **trainer_kw)
    trainer.fit(module, datamodule=data)
    return record


def test_callback_raises_drop_path_linearly_per_step():
    record = _fit(ScheduledDropPath(interval="step"), max_steps=4)
    assert record.progress == pytest.approx([0.0, 0.25, 0.5, 0.75])  # global_step / max_steps
    last = 5 / 5 * (1 - 0.6)  # TINY has 5 cells; the last is the deepest
    assert record.drop == pytest.approx([f * last for f in record.progress])


def test_callback_per_epoch_and_with_the_released_total_steps():
    assert _fit(ScheduledDropPath(interval="epoch"), max_epochs=2).progress == pytest.approx([0, 0, 0.5, 0.5])
    assert _fit(ScheduledDropPath(total_steps=2), max_steps=4).progress == pytest.approx([0, 0.5, 1, 1])


def test_callback_on_a_network_without_drop_path_is_a_clear_error():
    with pytest.raises(TypeError, match="set_drop_path_progress"):
        _fit(ScheduledDropPath(), model="lenet5", max_steps=1)
    with pytest.raises(ValueError, match="interval"):
        ScheduledDropPath(interval="batch")


def test_cifar_recipe_is_the_released_setup(tmp_path, monkeypatch):
    from pathlib import Path

    from lightcnn.training.cli import LightCNNCLI

    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])
    path = Path(__file__).resolve().parents[1] / "experiments" / "nasnet_a_cifar10.yaml"
    cli = LightCNNCLI(["--config", str(path), "--run_root", str(tmp_path), "--trainer.logger", "false"],
                      stage="fit", experiment_name=path.stem)
    module, data, trainer = cli.model, cli.datamodule, cli.trainer
    assert module.hparams.model == "nasnet_a_cifar" and module.hparams.aux_loss_weights == 0.4
    assert data.batch_size == 32 and data.cutout == 0  # the 3.41% figure is without cutout
    cfg = module.configure_optimizers()
    group, sched = cfg["optimizer"].param_groups[0], cfg["lr_scheduler"]["scheduler"]
    assert (group["lr"], group["weight_decay"]) == (0.025, 5e-4)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) and cfg["lr_scheduler"]["interval"] == "step"
    assert sched.T_max == trainer.max_steps == 937_500 == 600 * 50_000 // 32  # cifar_config's total_training_steps
    assert (trainer.gradient_clip_val, trainer.gradient_clip_algorithm) == (5.0, "norm")
    (schedule,) = [cb for cb in trainer.callbacks if isinstance(cb, ScheduledDropPath)]
    assert schedule.interval == "step" and schedule.total_steps is None  # rises over the whole run
    assert module.net.aux is not None
    assert {round(p.max_drop_prob, 6) for p in drop_paths(list(module.net.cells.values())[-1])} == {0.4}


# ------------------------------------------------------------------------------------- SAME padding

def _tf_pool(x: torch.Tensor, kind: str, k: int, s: int) -> torch.Tensor:
    """TensorFlow's SAME pooling written out: output ceil(n / s), windows start at i * s - pad_before, and
    only real pixels take part (the max of them, or their mean)."""
    n_h, n_w = x.shape[-2:]
    out_h, out_w = math.ceil(n_h / s), math.ceil(n_w / s)
    pad_h = max((out_h - 1) * s + k - n_h, 0) // 2
    pad_w = max((out_w - 1) * s + k - n_w, 0) // 2
    out = torch.empty(*x.shape[:2], out_h, out_w, dtype=x.dtype)
    for i in range(out_h):
        for j in range(out_w):
            r0, c0 = i * s - pad_h, j * s - pad_w
            win = x[..., max(r0, 0):min(r0 + k, n_h), max(c0, 0):min(c0 + k, n_w)]
            out[..., i, j] = win.amax((-2, -1)) if kind == "max" else win.mean((-2, -1))
    return out


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("side, stride", [(8, 2), (9, 2), (7, 1), (6, 1)])
def test_same_pooling_matches_tensorflow(kind, side, stride):
    x = torch.randn(2, 3, side, side + 1, dtype=torch.float64)
    torch.testing.assert_close(PoolSame(kind, 3, stride)(x), _tf_pool(x, kind, 3, stride))


# ------------------------------------------------------------------------------------ timm weight import

def _timm_with_tf_average_pools(num_classes: int = 7):
    """timm's nasnetalarge, with its stride-2 average pools (which count the zero padding, unlike TensorFlow)
    replaced by TF's semantics for odd maps: torch's 3x3/2 pool with padding 1 that excludes the padding."""
    timm = pytest.importorskip("timm")
    from timm.layers import AvgPool2dSame

    model = timm.create_model("nasnetalarge", pretrained=False, num_classes=num_classes)
    for name, m in list(model.named_modules()):
        if isinstance(m, AvgPool2dSame):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.AvgPool2d(3, 2, 1, count_include_pad=False))
    with torch.no_grad():  # random BN statistics, so that a mis-mapped BN cannot hide
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def test_timm_nasnetalarge_weights_give_the_same_outputs():
    timm_model = _timm_with_tf_average_pools()
    # from a state dict, through the family's alias; from_timm's module input is the same load_twin path
    # (test_weights.py, test_models_inception.py)
    ours = nasnet_from_timm(timm_model.state_dict()).eval()
    assert ours.num_classes == 7 and ours.aux is None  # timm's class count; timm has no auxiliary head
    assert ours.default_cfg["mean"] == ours.default_cfg["std"] == (0.5, 0.5, 0.5)  # inception preprocessing
    # 131 -> 65 -> 33 -> 17 -> 9 -> 5: every stride-2 map is odd, where SAME padding is symmetric.
    x = torch.randn(2, 3, 131, 131)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_model(x), rtol=1e-4, atol=1e-6)


def test_timm_state_dict_maps_key_for_key_and_bad_input_is_an_error():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        sd = timm.create_model("nasnetalarge", pretrained=False).state_dict()
        ours = create("nasnet_a_large", aux_head=False)
    converted = convert_timm_state_dict(ours, sd)
    assert converted.keys() == ours.state_dict().keys()
    assert all(converted[k].shape == v.shape for k, v in ours.state_dict().items())
    assert "nasnet_a_large" in twins("timm")
    with pytest.raises(ValueError, match="no timm twin"):
        from_timm("nasnet_a_mobile", sd)
    with pytest.raises(ValueError, match="does not fit"):
        from_timm("nasnet_a_large", {k: v for k, v in sd.items() if "cell_17" not in k})


# ------------------------------------------------------------------------------- compile and autocast

def _compiled_matches_float64(backend: str) -> None:
    """Compiled float32 logits and gradients against the eager network in float64. Gradients are compared
    norm-wise per parameter: after ~40 train-mode BNs on a batch of 2, float32 (eager or compiled) differs
    from float64 by ~1e-4 relative, and single elements of the large stem gradients by more than any
    elementwise tolerance that would still catch a wrong graph."""
    model = create("nasnet_a_cifar", **TINY).train()
    model.set_drop_path_progress(0.0)  # nothing dropped: compiled and eager see the same randomness-free net
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model).double()
    out_r = reference(x.double())
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out_c = compiled(x)
    assert type(out_c) is NASNetOutputs
    torch.testing.assert_close(torch.stack(list(out_c)).double(), torch.stack(list(out_r)), rtol=1e-4, atol=1e-4)
    loss = lambda out: out.logits.logsumexp(-1).sum() + 0.4 * out.aux_logits.logsumexp(-1).sum()
    grads_r = torch.autograd.grad(loss(out_r), list(reference.parameters()))
    grads_c = torch.autograd.grad(loss(out_c), list(model.parameters()))
    for (name, _), gc, gr in zip(model.named_parameters(), grads_c, grads_r):
        assert ((gc.double() - gr).norm() / gr.norm()).item() < 2e-3, name
    # The schedule lives in buffers: moving it neither breaks the graph nor recompiles.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for fraction in (0.3, 1.0):
            model.set_drop_path_progress(fraction)
            assert torch.isfinite(compiled(x).logits).all()


def test_torch_compile_traces_one_graph_without_recompiling_as_the_schedule_moves():
    # 3 cells (N = 1, one reduction), so that dynamo's trace stays quick; the full check is the slow twin.
    model = create("nasnet_a_cifar", num_normal_cells=1, num_reduction_layers=1, penultimate_filters=48).train()
    model.set_drop_path_progress(0.0)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        y = compiled(x)
        torch.testing.assert_close(y, model(x), rtol=0, atol=0)
        model.set_drop_path_progress(1.0)
        assert not torch.equal(compiled(x), y)  # the same compiled graph now drops paths


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_float64_eager_with_gradients(backend):
    _compiled_matches_float64(backend)


@pytest.mark.parametrize("name", ["nasnet_a_cifar", "nasnet_a_mobile"])
def test_bfloat16_autocast(name):
    model = create(name).eval()
    side = published(name).input_side
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.forward_head(model.forward_features(x), pre_logits=True).dtype == torch.bfloat16
            y = model(x)
    assert torch.isfinite(y).all()
    centred = lambda t: t - t.mean(1, keepdim=True)
    # bfloat16 keeps 8 bits: ~0.4% per rounding, a few percent after ~20 cells of accumulation
    assert (centred(y.float()) - centred(expected)).norm() / centred(expected).norm() < 0.05
