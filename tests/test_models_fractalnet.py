"""FractalNet-20 (Larsson et al. 2017): counts, the fractal layout, joins, local and global drop-path.

Counts are taken on the meta device; everything else runs small real tensors on the CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lightcnn.models import create, list_models
from lightcnn.models.fractalnet import FractalJoin, FractalNet
from tests.helpers import bf16_autocast_error, build_experiment, build_meta, n_params


def conv_runs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """The model's output and the names of the convolutions that ran, in order."""
    ran: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = [m.register_forward_hook(lambda m, i, o: ran.append(names[m]))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, ran


def column_convs(model: FractalNet, k: int) -> list[str]:
    """Names of the convolutions of column k (1-based) in every block, in forward order."""
    return [f"blocks.{b}.columns.{k - 1}.{i}.conv" for b in range(len(model.blocks)) for i in range(2 ** (k - 1))]


def test_fractalnet20_is_registered_with_cifar_cfg():
    assert "fractalnet20" in list_models()
    model = build_meta("fractalnet20")
    assert model.default_cfg["input_size"] == (3, 32, 32) and model.default_cfg["dataset"] == "cifar10"
    assert model.num_classes == 10 and build_meta("fractalnet20", num_classes=100).default_cfg["dataset"] == "cifar100"


def test_fractalnet20_params_by_formula():
    # an independent count: per block 3 convs from the block's input (one per column) and 4 more at the
    # block's width (1 + 3 in columns 2 and 3), each 3x3 with bias and an affine BN; FC 512 -> 10
    total, c_in = 512 * 10 + 10, 3
    for c in (64, 128, 256, 512, 512):
        total += 3 * (9 * c_in * c + 3 * c) + 4 * (9 * c * c + 3 * c)
        c_in = c
    assert n_params(build_meta("fractalnet20")) == total
    # the authors' Caffe BatchNorm has no scale and shift: 2 c fewer per convolution
    no_affine = total - sum(2 * 7 * c for c in (64, 128, 256, 512, 512))
    assert n_params(build_meta("fractalnet20", bn_affine=False)) == no_affine == 33_714_314


def test_fractal_layout_follows_the_expansion_rule():
    model = build_meta("fractalnet20")
    assert len(model.blocks) == 5
    for block, width in zip(model.blocks, (64, 128, 256, 512, 512)):
        assert [len(col) for col in block.columns] == [1, 2, 4]  # column k: 2^(k-1) layers
        assert all(unit.conv.out_channels == width for col in block.columns for unit in col)
        # f_3 = join(f_2(f_2(z)), conv(z)): joins after the 2nd layer (2 inputs) and the 4th (3 inputs)
        assert [block.columns_at(d) for d in range(4)] == [[2], [1, 2], [2], [0, 1, 2]]
        assert sorted(block.joins) == ["1", "3"]
        # conv -> dropout -> BN -> ReLU, as the authors' Caffe template
        assert [type(m) for m in block.columns[0][0]] == [nn.Conv2d, nn.Dropout, nn.BatchNorm2d, nn.ReLU]
    assert [b.columns[0][0].dropout.p for b in model.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    # the deepest path has 4 layers per block: 20 convolutions, the network's name
    assert len(column_convs(model, 3)) == 20


def test_join_is_the_elementwise_mean():
    inputs = [torch.randn(2, 4, 3, 3) for _ in range(3)]
    expected = (inputs[0] + inputs[1] + inputs[2]) / 3
    torch.testing.assert_close(FractalJoin(0.0).train()(inputs), expected)
    torch.testing.assert_close(FractalJoin(0.9).eval()(inputs), expected)  # no drop-path in eval


def test_local_drop_path_averages_the_survivors_and_keeps_at_least_one():
    # inputs 1, 10, 100: the output's value tells which of them survived
    inputs = [torch.full((1,), v) for v in (1.0, 10.0, 100.0)]
    subsets = {}
    join = FractalJoin(0.5).train()
    for _ in range(400):
        out = join(inputs).item()
        subsets.setdefault(round(out, 4), 0)
        subsets[round(out, 4)] += 1
    means = {round(sum(s) / len(s), 4) for s in [(1.,), (10.,), (100.,), (1., 10.), (1., 100.), (10., 100.),
                                                 (1., 10., 100.)]}
    assert set(subsets) == means  # every non-empty subset occurs, nothing else (no empty join)
    # with every input dropped, exactly one (uniformly chosen) survives
    always = FractalJoin(1.0).train()
    picks = [always(inputs).item() for _ in range(300)]
    assert set(picks) == {1.0, 10.0, 100.0}
    assert all(abs(picks.count(v) / 300 - 1 / 3) < 0.1 for v in (1.0, 10.0, 100.0))


def test_local_drop_rate_per_input():
    # input i is dropped when its draw falls under p, unless all were dropped and it was the one rescued:
    # P = p (1 - p) + p^2 / 2 for two inputs
    p, n = 0.15, 4000
    join = FractalJoin(p).train()
    dropped = sum(0 not in join.kept(2) for _ in range(n)) / n
    expected = p * (1 - p) + p * p / 2
    assert abs(dropped - expected) < 4 * (expected * (1 - expected) / n) ** 0.5


def test_global_drop_path_keeps_one_column_for_the_whole_network():
    model = create("fractalnet20", global_drop_ratio=1.0, drop_rates=(0.0,) * 5).train()
    x = torch.randn(2, 3, 32, 32)
    seen = set()
    for _ in range(12):
        y, ran = conv_runs(model, x)
        k = [k for k in (1, 2, 3) if ran == column_convs(model, k)]
        assert len(k) == 1, f"ran {ran}: not a single column"
        seen.add(k[0])
        model.set_column(k[0])  # the same column run on purpose gives the same output
        torch.testing.assert_close(model(x), y)
        model.set_column(None)
    assert seen == {1, 2, 3}


def test_half_the_batches_use_global_drop_path_and_columns_are_uniform():
    model = build_meta("fractalnet20").train()
    draws = [model.sample_global_column() for _ in range(3000)]
    assert abs(sum(d is not None for d in draws) / 3000 - 0.5) < 0.04
    counts = [draws.count(k) for k in (1, 2, 3)]
    assert all(abs(c / sum(counts) - 1 / 3) < 0.05 for c in counts)
    assert all(model.eval().sample_global_column() is None for _ in range(50))


def test_local_batches_run_every_column():
    model = create("fractalnet20", global_drop_ratio=0.0).train()
    _, ran = conv_runs(model, torch.randn(2, 3, 32, 32))
    assert sorted(ran) == sorted(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def test_drop_path_only_in_training_and_eval_is_deterministic():
    model = create("fractalnet20").eval()
    plain = create("fractalnet20", drop_path_rate=0.0, global_drop_ratio=0.0, drop_rates=(0.0,) * 5).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y1, ran = conv_runs(model, x)
        assert torch.equal(y1, model(x))
        torch.testing.assert_close(plain(x), y1)  # eval ignores every drop rate
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), y1)
    assert len(ran) == 35  # all 7 convolutions of all 5 blocks
    model.train()
    with torch.no_grad():
        outs = [model(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # drop-path and dropout act in training


@pytest.mark.parametrize("k", [1, 2, 3])
def test_set_column_evaluates_one_column_alone(k):
    model = create("fractalnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    model.set_column(k)
    with torch.no_grad():
        y, ran = conv_runs(model, x)
        assert ran == column_convs(model, k)
        # the column is a plain network: its layers then the pool, block after block
        h = x
        for block in model.blocks:
            h = block.pool(block.columns[k - 1](h))
        torch.testing.assert_close(y, model.fc(torch.flatten(h, 1)))
    model.set_column(None)
    assert len(conv_runs(model, x)[1]) == 35
    assert create("fractalnet20", column=2).column == 2


def test_bad_column_and_rates_are_refused():
    model = build_meta("fractalnet20")
    for bad in (0, 4, 1.0):
        with pytest.raises(ValueError, match="column must be None or an int in 1..3"):
            model.set_column(bad)
    with pytest.raises(ValueError, match="one dropout rate per block"):
        FractalNet(drop_rates=(0.1, 0.2))
    with pytest.raises(ValueError, match="probabilities"):
        FractalNet(drop_path_rate=1.5)


def test_forward_backward_at_native_size():
    model = create("fractalnet20", drop_path_rate=0.0, global_drop_ratio=0.0).train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    # with drop-path on, the dropped paths simply get no gradient; the kept ones get finite ones
    model = create("fractalnet20").train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _compiled_matches_eager(model: FractalNet, side: int, backend: str = "inductor") -> None:
    x = torch.randn(2, 3, side, side)
    compiled = torch.compile(model, backend=backend)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_runs_under_torch_compile():
    # dynamo + AOT autograd (the tracing that a model's Python can break) on a two-block, three-column
    # FractalNet: the same joins and columns in seconds; inductor's C++ code generation for the full
    # network takes minutes on 2 shared CPU cores (the slow twin below)
    model = FractalNet(channels=(8, 16), drop_rates=(0.0, 0.0), drop_path_rate=0.0, global_drop_ratio=0.0,
                       input_size=8)
    _compiled_matches_eager(model.train(), 8, backend="aot_eager")
    # drop-path draws its paths in Python (one draw per mini-batch): compiled, it still runs a single column
    model.global_drop_ratio = 1.0
    x = torch.randn(2, 3, 8, 8)
    y = torch.compile(model.train(), backend="aot_eager")(x)
    by_column = []
    for k in (1, 2, 3):
        model.set_column(k)
        by_column.append(model(x))
    assert sum(torch.allclose(y, c, rtol=1e-4, atol=1e-4) for c in by_column) == 1


@pytest.mark.slow
def test_fractalnet20_runs_under_torch_compile():
    model = create("fractalnet20", drop_rates=(0.0,) * 5, drop_path_rate=0.0, global_drop_ratio=0.0)
    _compiled_matches_eager(model.train(), 32)


def test_bfloat16_autocast():
    # bfloat16 keeps 8 bits (about 0.4% per rounding); the classic models' bound is 3%
    assert bf16_autocast_error(create("fractalnet20"), torch.randn(2, 3, 32, 32)) < 0.03


def test_recipe_is_the_papers(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])
    cli = build_experiment("fractalnet20_cifar10", tmp_path)
    cfg = cli.model.configure_optimizers()
    group, sched = cfg["optimizer"].param_groups[0], cfg["lr_scheduler"]["scheduler"]
    assert (group["lr"], group["momentum"]) == (0.02, 0.9) and cli.datamodule.batch_size == 100
    # lr / 10 each time the remaining epochs halve: 200, 300, 350, 375 of 400
    assert sorted(sched.milestones) == [200, 300, 350, 375] and sched.gamma == 0.1
    assert cli.trainer.max_epochs == 400
    net = cli.model.net
    assert [b.columns[0][0].dropout.p for b in net.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert {j.drop_path_rate for b in net.blocks for j in b.joins.values()} == {0.15}
    assert net.global_drop_ratio == 0.5
