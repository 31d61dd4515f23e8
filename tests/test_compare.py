"""`python -m lightcnn.compare`: counts against lightcnn.published, saved-activation bytes against a hand
count, the table/CSV/chart written, clear errors, and MACs that do not depend on the kernels."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightcnn.compare import (
    ROUNDS,
    TIMED_STEPS,
    WARMUP_STEPS,
    busy_note,
    chart_points,
    count_macs,
    main,
    read_runs,
    saved_activation_bytes,
    seconds_per_step,
    select,
)
from lightcnn.layers import get_default_impl
from lightcnn.ops import library_loaded
from lightcnn.published import MODELS, published

DIGITS = Path(__file__).resolve().parents[1] / "experiments" / "lenet5_digits.yaml"


def test_compare_cli_writes_table_csv_and_chart_matching_published_counts(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--models", "lenet5,resnet2*,alexnet", "--no-speed", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "compare.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["lenet5", "resnet20", "alexnet"]
    for r in rows:
        pub = published(r["model"])
        assert int(r["params"]) == pub.params
        assert float(r["gmacs"]) == pytest.approx(pub.gmacs, rel=0.01)
        assert float(r["act_mib_per_image"]) > 0
        assert r["infer_img_s"] == ""  # --no-speed
    assert rows[2]["top1_err"] == str(published("alexnet").top1_err)
    table = (out / "compare.md").read_text()
    assert "| alexnet | alexnet | imagenet | 227x227 | 60,965,224 | 0.7244 |" in table
    assert table == capsys.readouterr().out.split("wrote ")[0].rstrip("\n") + "\n"
    img = mpimg.imread(out / "compare.png")
    assert img.shape[0] > 200 and img[..., :3].std() > 0.01


def test_compare_measures_speed_when_asked_with_the_threads_asked(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["--models", "lenet5", "--out", str(tmp_path), "--min-time", "0.05", "--batch-size", "4",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    (row,) = csv.DictReader((tmp_path / "compare.csv").read_text().splitlines())
    assert float(row["infer_img_s"]) > 0 and float(row["train_img_s"]) > 0
    assert "Speed on cpu (1 CPU thread), fp32" in (tmp_path / "compare.md").read_text()
    assert main(["--models", "lenet5", "--out", str(tmp_path), "--threads", "0"]) == 2
    assert capsys.readouterr().err.endswith("--threads must be >= 1, got 0\n")


def test_saved_activation_bytes_counts_what_autograd_keeps_for_the_backward():
    """conv keeps its input (its weight is a parameter: excluded); the ReLU keeps its output; the final
    linear layer keeps the ReLU's output again (the same storage, counted once) and its weight."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    x_bytes = 2 * 3 * 8 * 8 * 4
    relu_bytes = 2 * 8 * 6 * 6 * 4
    assert saved_activation_bytes(model, (3, 8, 8), batch=2) == x_bytes + relu_bytes


def test_select_names_patterns_and_clear_errors(capsys):
    assert select("resnet2*,lenet5,wrn16_4") == ["resnet20", "lenet5", "wrn16_4"]
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*Closest: .*resnet20"):
        select("resnet21")
    with pytest.raises(ValueError, match="no registered model matches 'nosuch\\*'"):
        select("nosuch*")
    assert main(["--models", "vgg17"]) == 2
    assert "unknown model 'vgg17'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--no-speed" in capsys.readouterr().out


class OpNamespaces(TorchDispatchMode):
    """Records the namespace of every op that runs (aten, lightcnn, ...)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not library_loaded(), reason="needs the compiled lightcnn._C")
def test_impl_is_the_layers_default_while_measuring_and_the_macs_do_not_depend_on_it(monkeypatch):
    """--impl goes through lightcnn.layers' resolution (the process-wide default while a model is measured):
    "kernel" runs torch.ops.lightcnn.*, "reference" none, and both count the same MACs."""
    from lightcnn import compare as cmp

    seen, macs, default = {}, {}, get_default_impl()

    def spy(model, input_size):
        with OpNamespaces() as ops:
            macs = count_macs(model, input_size)
        seen[get_default_impl()] = ops.seen
        return macs

    monkeypatch.setattr(cmp, "count_macs", spy)
    monkeypatch.setattr(cmp, "saved_activation_bytes", lambda *a, **k: 0)
    for impl in ("kernel", "reference"):  # WRN-10-1: a small network of fused BN-ReLU-convs
        macs[impl] = cmp.measure("wrn10_1", speed=False, impl=impl)["gmacs"]
    assert "lightcnn" in seen["kernel"] and "lightcnn" not in seen["reference"]
    assert macs["kernel"] == macs["reference"] > 0
    assert get_default_impl() == default  # restored after each model



# --- timing: a warm-up, so that the order of the models does not change the figures ------------------------


class FakeClock:
    """A clock that a fake step advances: the first `slow` steps of the process take `slow_s` seconds each
    (what a first model pays for thread pools, allocator and kernel choice), every later one `fast_s`."""

    def __init__(self, slow: int, slow_s: float = 10.0, fast_s: float = 1.0):
        self.now, self.calls, self.slow, self.slow_s, self.fast_s = 0.0, 0, slow, slow_s, fast_s

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += self.slow_s if self.calls < self.slow else self.fast_s
        self.calls += 1


def test_warm_up_absorbs_the_slow_first_steps_so_the_first_model_times_as_the_last():
    clock = FakeClock(slow=6)
    first = seconds_per_step(clock.step, min_time=20.0, warmup=50.0, clock=clock)
    assert clock.calls >= 6 + 5  # the warm-up ran the six slow steps (and more) before any timing
    last = seconds_per_step(clock.step, min_time=20.0, warmup=50.0, clock=clock)
    assert first == last == 1.0
    # the same step counted from its first call, as the comparison did before, charges the slow start
    clock = FakeClock(slow=6)
    start, n = clock(), 0
    while clock() - start < 20.0:
        clock.step()
        n += 1
    assert (clock() - start) / n > 2.0


def test_warm_up_runs_at_least_three_steps_and_its_time_before_timing():
    clock = FakeClock(slow=0)
    seconds_per_step(clock.step, min_time=0.0, warmup=0.0, clock=clock)
    assert clock.calls == WARMUP_STEPS + TIMED_STEPS
    clock = FakeClock(slow=0)
    seconds_per_step(clock.step, min_time=0.0, warmup=7.0, clock=clock)
    assert clock.calls == 7 + TIMED_STEPS


def test_a_slowdown_over_most_of_the_timing_leaves_the_median_of_the_fastest_round():
    """Another process slowing the machine down for the first 32 of 40 timed steps: the median of all steps
    would be the slow 3.0; the last round ran undisturbed and gives the step's own 1.0."""
    durations = iter([1.0] * WARMUP_STEPS + [3.0] * 32 + [1.0] * 8)
    clock = FakeClock(slow=0)
    step = lambda: setattr(clock, "now", clock.now + next(durations))  # noqa: E731
    assert seconds_per_step(step, min_time=32 * 3.0 + 8 * 1.0, warmup=0.0, clock=clock) == 1.0
    assert ROUNDS == 5 and TIMED_STEPS * ROUNDS <= 40  # five rounds of eight steps
    # fewer than TIMED_STEPS steps a round: one round, the median of all
    durations = iter([1.0] * WARMUP_STEPS + [3.0] * 6 + [1.0] * 3)
    assert seconds_per_step(step, min_time=6 * 3.0 + 3 * 1.0 - 0.5, warmup=0.0, clock=clock) == 3.0


def test_busy_machine_note_recommends_one_thread_only_where_it_helps():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert busy_note("cpu", True, load=19.6, cores=2) == (
            "the load average (19.6) exceeds the 2 CPU cores: timings on 2 threads wait for other jobs; "
            "--threads 1 gives stable figures")
        assert busy_note("cpu", True, load=1.5, cores=2) == ""  # a quiet machine
        assert busy_note("cpu", False, load=19.6, cores=2) == ""  # --no-speed
        assert busy_note("cuda", True, load=19.6, cores=2) == ""
        torch.set_num_threads(1)
        assert busy_note("cpu", True, load=19.6, cores=2) == ""
    finally:
        torch.set_num_threads(threads)


ORDER = textwrap.dedent("""
    import json, torch
    from lightcnn.compare import compare
    torch.set_num_threads(1)  # the figures of one thread: on a shared machine several wait on each other
    rows = compare(["lenet5", "resnet20", "lenet5"], speed=True, batch_size=8, min_time=2.0, progress=False)
    print(json.dumps([[r["infer_img_s"], r["train_img_s"]] for r in rows]))
""")


@pytest.mark.slow
def test_the_same_model_timed_first_and_last_agrees_within_10_percent_on_a_quiet_machine():
    """lenet5 timed first in a fresh process and again after resnet20 agree within 2x on any machine (the
    order effect the warm-up removes is far larger), and within 10% on a quiet one: set
    LIGHTCNN_QUIET_MACHINE=1 where nothing else runs, neither on the machine nor on its host (a shared VM
    slows whole seconds of a timing, which no estimator removes). Slow: a fresh process and six timings;
    benchmarks/RESULTS.md ("compare: order") has the figures."""
    proc = subprocess.run([sys.executable, "-c", ORDER], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, _, last = json.loads(proc.stdout.strip().splitlines()[-1])
    quiet = os.environ.get("LIGHTCNN_QUIET_MACHINE") == "1"
    low, high = (0.9, 1.1) if quiet else (0.5, 2.0)
    for kind, f, l in zip(("inference", "training"), first, last):
        assert low < f / l < high, (kind, f, l, "quiet machine" if quiet else "shared machine")


# --- nothing measured is lost: --out checked first, rows written as measured, Ctrl-C keeps them ----------


def test_an_unwritable_out_is_one_line_before_anything_is_measured(tmp_path, capsys, monkeypatch):
    measured = []
    monkeypatch.setattr("lightcnn.compare.measure", lambda name, *a, **k: measured.append(name))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["--models", "lenet5", "--no-speed", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightcnn.compare: error: --out ") and "not writable" in err and err.count("\n") == 1
    assert measured == []


def test_each_row_is_on_disk_as_measured_and_ctrl_c_keeps_them_with_exit_130(tmp_path, capsys, monkeypatch):
    from lightcnn import compare as cmp

    real, seen = cmp.measure, []

    def measure(name, *a, **k):
        if name == "resnet20":  # the first row is already in the table when the second model starts
            seen.append([r["model"] for r in csv.DictReader((tmp_path / "compare.csv").read_text().splitlines())])
            raise KeyboardInterrupt
        return real(name, *a, **k)

    monkeypatch.setattr(cmp, "measure", measure)
    assert main(["--models", "lenet5,resnet20,alexnet", "--no-speed", "--out", str(tmp_path)]) == 130
    assert seen == [["lenet5"]]
    rows = list(csv.DictReader((tmp_path / "compare.csv").read_text().splitlines()))
    assert [r["model"] for r in rows] == ["lenet5"] and int(rows[0]["params"]) == published("lenet5").params
    assert "| lenet5 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").is_file()
    assert "interrupted: kept the 1 of 3 models" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


# --- published errors with their sources, and one's own runs beside them ----------------------------------

CIFAR_PAPER_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202", "preact_resnet164",
                      "preact_resnet1001", "wrn28_10", "wrn16_8", "wrn40_4", "resnext29_8x64d", "resnext29_16x64d",
                      "densenet40_k12", "densenet100_k12", "densenet_bc100_k12", "densenet_bc250_k24",
                      "densenet_bc190_k40", "fractalnet20", "nasnet_a_cifar", "sd_resnet110", "sd_resnet1202"]


def test_every_cifar_model_of_the_papers_has_its_published_error_and_source():
    for name in CIFAR_PAPER_MODELS:
        pub = published(name)
        assert pub.top1_err is not None and pub.source, name
    # He et al. 2016, Table 6; Huang et al. 2017, Table 2; Zagoruyko & Komodakis 2016
    assert [published(f"resnet{d}").top1_err for d in (20, 32, 44, 56, 110, 1202)] == \
        [8.75, 7.51, 7.17, 6.97, 6.43, 7.93]
    assert (published("densenet40_k12").top1_err, published("densenet40_k12").c100_err) == (5.24, 24.42)
    assert published("wrn40_4").top1_err == 4.53 and "Table" in published("wrn40_4").source
    for name, pub in MODELS.items():
        if name != "densenet121" and (pub.top1_err is not None or pub.top5_err is not None):
            assert pub.source, f"{name}: a published error without its source"


def test_chart_plots_every_cifar_model_with_a_published_error():
    rows = [{"model": n, "family": "f", "dataset": "cifar10", "gmacs": 0.1, "params": 1, "top1_err":
             published(n).top1_err, "c100_err": published(n).c100_err} for n in CIFAR_PAPER_MODELS]
    points = chart_points(rows)
    assert sorted(p["model"] for p in points["cifar10"]) == sorted(CIFAR_PAPER_MODELS)
    assert "cifar100" not in points  # drawn only beside one's own CIFAR-100 runs


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory):
    """Two real run folders of `lightcnn.fit` (digits, a few batches): one whose metrics table is
    Lightning's CSVLogger metrics.csv, one with W&B's wandb-summary.json."""
    from lightcnn.training.cli import main as fit

    root = tmp_path_factory.mktemp("runs")
    quiet = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
             "--trainer.limit_test_batches", "2"]
    accs = []
    deterministic = torch.are_deterministic_algorithms_enabled()  # the recipe's deterministic: true is global
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for _ in range(2):
            cli = fit([str(DIGITS), "--run_root", str(root), *quiet])
            accs.append(cli.trainer.callback_metrics["test/acc1"].item())
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    first, second = sorted((root / "lenet5_digits").iterdir())
    (first / "csv" / "version_0").mkdir(parents=True)
    (first / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,test/acc1,test/acc5,val/acc1\n0,2,,,0.5\n0,3," + f"{accs[0]},1.0,\n")
    (second / "wandb" / "files").mkdir(parents=True)
    (second / "wandb" / "files" / "wandb-summary.json").write_text(json.dumps({"test/acc1": accs[1], "_step": 3}))
    return root, first, second, accs


def test_read_runs_reads_model_data_set_and_test_accuracy_of_each_run_folder(runs_folder):
    root, first, second, accs = runs_folder
    runs = read_runs(root)
    assert [r["run"] for r in runs] == [str(first), str(second)]
    assert all(r["model"] == "lenet5" and r["dataset"] == "digits" for r in runs)
    assert runs[0]["acc1"] == pytest.approx(100 * accs[0]) and "csv/version_0/metrics.csv" in runs[0]["metric"]
    assert runs[1]["acc1"] == pytest.approx(100 * accs[1]) and "wandb-summary.json" in runs[1]["metric"]
    with pytest.raises(ValueError, match="holds no run folder"):
        read_runs(first / "checkpoints")
    with pytest.raises(ValueError, match="is no folder"):
        read_runs(root / "missing")


def test_compare_results_puts_ones_own_runs_beside_the_papers(runs_folder, tmp_path):
    root, first, _, accs = runs_folder
    assert main(["--results", str(root), "--no-speed", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "compare.md").read_text()
    assert f"| {first} | lenet5 | digits | {100 * accs[0]:.2f} | test/acc1 in csv/version_0/metrics.csv | - |" in table
    (row,) = csv.DictReader((tmp_path / "compare.csv").read_text().splitlines())
    assert row["model"] == "lenet5"  # without --models: the runs' models
    runs = read_runs(root)
    points = chart_points([{**row, "gmacs": float(row["gmacs"]), "params": int(row["params"]), "top1_err": None}],
                          runs)
    assert [(p["kind"], p["acc"]) for p in points["digits"]] == [("run", r["acc1"]) for r in runs]
    img = mpimg.imread(tmp_path / "compare.png")
    assert img[..., :3].std() > 0.01
    assert main(["--results", str(root), "--models", "resnet20", "--no-speed", "--out", str(tmp_path)]) == 0
    assert [r["model"] for r in csv.DictReader((tmp_path / "compare.csv").read_text().splitlines())] == \
        ["resnet20", "lenet5"]  # the runs' model is added to --models


def test_a_cifar100_run_of_a_subclassed_module_opens_a_panel_with_the_papers_cifar100_errors(tmp_path):
    run = tmp_path / "wrn_c100" / "20260101-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  class_path: mypkg.MixupModule\n  init_args:\n    model: wrn28_10\n"
                                     "data:\n  class_path: lightcnn.data.CIFAR100DataModule\n")
    (run / "metrics.csv").write_text("epoch,step,test/acc1\n199,78000,0.8012\n")
    (r,) = read_runs(tmp_path)
    assert (r["model"], r["dataset"], r["acc1"]) == ("wrn28_10", "cifar100", pytest.approx(80.12))
    rows = [{"model": n, "family": "f", "dataset": "cifar10", "gmacs": 1.0, "params": 1, "top1_err":
             published(n).top1_err, "c100_err": published(n).c100_err} for n in ("wrn28_10", "resnet20")]
    points = chart_points(rows, [r])
    assert sorted((p["kind"], p["model"], round(p["acc"], 2)) for p in points["cifar100"]) == \
        [("published", "wrn28_10", 80.75), ("run", "wrn28_10", 80.12)]  # resnet20: no CIFAR-100 figure
