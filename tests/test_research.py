"""Research through the command line: your own network and module, starting weights, modern knobs,
evaluation reports, logging, sweeps and guard rails (tiny models, CPU, in-process CLI)."""
import csv
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from lightcnn import predict as predict_cli
from lightcnn import runs as runs_cli
from lightcnn.models import create, is_model
from lightcnn.training.cli import SaveRunConfig, main
from lightcnn.training.module import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "lenet5_digits.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
NO_LOG = ["--trainer.logger", "false", *QUIET]
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]
CSV_LOG = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "elsewhere"]

NETS = '''
import torch
from torch import nn


def tiny(num_classes=10, in_chans=1, width=4):
    """conv3x3(in_chans -> width, pad 1) on 32x32, ReLU, global pooling, linear."""
    net = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(width, num_classes))
    net.num_classes, net.in_chans = num_classes, in_chans
    net.default_cfg = {"input_size": (in_chans, 32, 32)}
    return net
'''

MODULES = '''
from lightcnn.training.module import ClassifierModule


class CountingModule(ClassifierModule):
    """Cross-entropy, counting its calls: proves the CLI trained with this class."""
    calls = 0

    def compute_loss(self, logits, target):
        CountingModule.calls += 1
        return super().compute_loss(logits, target)
'''


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """A user's modules on sys.path: `mynets.tiny` (a network) and `mymods.CountingModule` (a module)."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "mynets.py").write_text(NETS)
    (pkg / "mymods.py").write_text(MODULES)
    monkeypatch.syspath_prepend(str(pkg))
    return pkg


def _run_dir(cli) -> Path:
    return Path(next(cb for cb in cli.trainer.callbacks if isinstance(cb, SaveRunConfig)).run_dir)


# --- 1. your own network and module ---------------------------------------------------------------------


def test_builder_path_and_entry_point_create_the_user_network(user_pkg):
    net = create("mynets:tiny", num_classes=3, in_chans=2, width=5)
    assert net[0].weight.shape == (5, 2, 3, 3) and net[-1].out_features == 3
    assert not is_model("tinynet")
    dist = user_pkg / "mynets-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mynets\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lightcnn.models]\ntinynet = mynets:tiny\n")
    assert is_model("tinynet")
    assert create("tinynet", num_classes=4, width=6)[0].weight.shape == (6, 1, 3, 3)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        create("mynets:nope")


def test_fit_trains_a_user_network_and_load_from_checkpoint_needs_no_argument(user_pkg, tmp_path):
    cli = main([DIGITS, "--run_root", str(tmp_path), "--model.model", "mynets:tiny",
                "--model.model_kwargs", "{width: 6}", *SHORT, *NO_LOG])
    assert cli.model.net[0].weight.shape == (6, 1, 3, 3)
    ckpt = _run_dir(cli) / "checkpoints" / "last.ckpt"
    loaded = ClassifierModule.load_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), cli.model.eval().cpu()(x), rtol=0, atol=0)


def test_model_subclass_trains_and_the_saved_config_tests_it(user_pkg, tmp_path):
    import mymods

    mymods.CountingModule.calls = 0
    cli = main([DIGITS, "--run_root", str(tmp_path), "--model", "mymods.CountingModule", *SHORT, *NO_LOG])
    assert type(cli.model).__name__ == "CountingModule" and cli.model.hparams.model == "lenet5"
    assert mymods.CountingModule.calls > 0
    run = _run_dir(cli)
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["class_path"] == "mymods.CountingModule" and saved["init_args"]["model"] == "lenet5"
    (run / "per_class_accuracy.csv").unlink()  # written again by `lightcnn.test`, into the checkpoint's run
    test = main([str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *NO_LOG],
                stage="test")
    assert type(test.model).__name__ == "CountingModule"
    assert test.trainer.callback_metrics["test/acc1"].item() == cli.trainer.callback_metrics["test/acc1"].item()
    with open(run / "per_class_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    correct = sum(int(r["correct"]) for r in rows) / sum(int(r["images"]) for r in rows)
    assert correct == pytest.approx(test.trainer.callback_metrics["test/acc1"].item(), abs=1e-6)


# --- 2. starting weights ------------------------------------------------------------------------------------


def test_init_weights_from_another_class_count_keeps_features_and_a_fresh_classifier(tmp_path):
    source = create("lenet5", num_classes=5)
    torch.save(source.state_dict(), tmp_path / "lenet5_5cls.pt")
    cli = main([DIGITS, "--run_root", str(tmp_path), "--model.init_weights", str(tmp_path / "lenet5_5cls.pt"),
                "--trainer.max_steps", "1", "--model.optimizer.init_args.lr", "0.0", "--test_after_fit", "false",
                *NO_LOG])
    trained = cli.model.net.state_dict()
    for key, value in source.state_dict().items():
        if value.shape == trained[key].shape:
            torch.testing.assert_close(trained[key], value, rtol=0, atol=0)
    assert trained["classifier.weight"].shape[0] == 10  # the digits' 10 classes, freshly initialised


def test_init_weights_reads_a_torchvision_twin_state_dict(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(tv.state_dict(), tmp_path / "tv_resnet18.pth")
    module = ClassifierModule("resnet18", num_classes=7, init_weights=str(tmp_path / "tv_resnet18.pth")).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(module(x), tv(x), rtol=1e-4, atol=1e-5)
    fresh = ClassifierModule("resnet18", num_classes=3, init_weights=str(tmp_path / "tv_resnet18.pth"))
    torch.testing.assert_close(fresh.net.conv1.weight, tv.conv1.weight, rtol=0, atol=0)


def test_init_weights_that_do_not_fit_are_one_line_listing_the_keys(tmp_path, capsys):
    torch.save(create("lenet5").state_dict(), tmp_path / "lenet5.pt")
    with pytest.raises(SystemExit) as e:
        main([DIGITS, "--run_root", str(tmp_path), "--model.model", "resnet20", "--model.model_kwargs",
              "{in_chans: 1}", "--model.init_weights", str(tmp_path / "lenet5.pt"), *NO_LOG])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit resnet20" in err and "missing [" in err and "conv1.weight" in err
    assert "Traceback" not in err


def _image_tree(root: Path, classes=("cat", "dog", "owl"), per_class=4, side=40) -> Path:
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 255, (side, side, 3), generator=g, dtype=torch.uint8)
                pixels[..., c] = 255  # each class has its own dominant colour
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root


FOLDER_RECIPE = """
seed_everything: 0
model:
  model: resnet20
  optimizer:
    class_path: torch.optim.SGD
    init_args: {{lr: 0.05, momentum: 0.9}}
data:
  class_path: lightcnn.data.ImageNetDataModule
  init_args: {{root: {root}, batch_size: 4, image_size: 32, resize_size: 36, num_workers: 0,
              auto_augment: trivialaugment, random_erasing: 0.5}}
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{save_last: true}}
"""


def test_fine_tune_on_your_own_images_then_test_report_and_predict(tmp_path, capsys):
    images = _image_tree(tmp_path / "pets")
    recipe = tmp_path / "pets.yaml"
    recipe.write_text(FOLDER_RECIPE.format(root=images))
    cli = main([str(recipe), "--run_root", str(tmp_path / "runs"), *NO_LOG])
    assert cli.model.num_classes == 3 and cli.model.class_names == ["cat", "dog", "owl"]
    run = _run_dir(cli)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["lightcnn"]["class_names"] == ["cat", "dog", "owl"]
    assert ckpt["lightcnn"]["eval"]["image_size"] == 32 and ckpt["lightcnn"]["eval"]["resize_size"] == 36
    # The test's reports: per-class accuracy agrees with the confusion matrix and with test/acc1.
    with open(run / "per_class_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["cat", "dog", "owl"] and all(r["images"] == "4" for r in rows)
    with open(run / "confusion_matrix.csv") as f:
        matrix = [[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]]
    assert [matrix[i][i] for i in range(3)] == [int(r["correct"]) for r in rows]
    acc1 = json.loads((run / "test_metrics.json").read_text())["test/acc1"]
    assert acc1 == pytest.approx(sum(int(r["correct"]) for r in rows) / 12, abs=1e-6)
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # predict: the run's eval transform (resize 36, crop 32, its mean/std) gives the module's own outputs.
    out = tmp_path / "predictions.csv"
    predicted = predict_cli.main([str(run), str(images / "val"), "--out", str(out), "--top_k", "2"])
    assert len(predicted) == 12 and out.read_text().startswith("image,class_1,prob_1,class_2,prob_2")
    dm = cli.datamodule
    model = cli.model.eval().cpu()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    probs = model(x).softmax(-1)
    by_path = {Path(p).resolve(): i for i, (p, _) in enumerate(dm.test_set.samples)}
    for row in predicted:
        i = by_path[Path(row["image"]).resolve()]
        assert row["class_1"] == ["cat", "dog", "owl"][int(probs[i].argmax())]
        assert row["prob_1"] == pytest.approx(probs[i].max().item(), abs=1e-5)


def test_folder_data_module_infers_class_count_and_names(tmp_path):
    from lightcnn.data import ImageNetDataModule

    dm = ImageNetDataModule(root=str(_image_tree(tmp_path / "imgs", classes=("a", "b"))), num_workers=0)
    assert dm.num_classes == 2 and dm.class_names == ["a", "b"]
    assert ImageNetDataModule(root=str(tmp_path / "missing"), num_workers=0).num_classes == 1000


def test_predict_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict_cli.main([str(tmp_path / "nowhere"), "x.png"])
    assert e.value.code == 2 and "neither a run folder nor a checkpoint" in capsys.readouterr().err


# --- 3. modern recipe knobs ---------------------------------------------------------------------------------


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, weight_decay=0.01)


def test_mixup_cutmix_trains_on_soft_targets_and_measures_hard_labels():
    module = ClassifierModule("lenet5", optimizer=_sgd, mixup_alpha=0.4, cutmix_alpha=1.0, num_classes=10)
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8)
    torch.manual_seed(3)
    loss = module._step((x, y), module.train_metrics, "train")
    torch.manual_seed(3)
    mixed_x, soft = module._mix(x, y)
    assert soft.shape == (8, 10) and not torch.equal(mixed_x, x)
    expected = torch.nn.functional.cross_entropy(module(mixed_x), soft)
    torch.testing.assert_close(loss, expected)
    acc = module.train_metrics.compute()["train/acc1"]
    assert acc == (module(mixed_x).argmax(-1) == y).float().mean()  # against the hard labels


def test_linear_warmup_rises_into_the_schedule(tmp_path):
    cli = main([DIGITS, "--run_root", str(tmp_path), "--model.warmup", "linear", "--model.warmup_steps", "4",
                "--model.warmup_factor", "0.2", "--trainer.max_steps", "6", "--trainer.log_every_n_steps", "1",
                "--model.lr_scheduler", "null", "--test_after_fit", "false", *CSV_LOG, *QUIET])
    with open(_run_dir(cli) / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")]
    base = 0.05
    assert lrs == pytest.approx([base * (0.2 + 0.8 * s / 4) for s in range(4)] + [base, base])


def test_weight_decay_norm_bias_false_exempts_one_dimensional_parameters():
    module = ClassifierModule("resnet20", optimizer=_sgd, weight_decay_norm_bias=False)
    opt = module.configure_optimizers()
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))
    together = ClassifierModule("resnet20", optimizer=_sgd).configure_optimizers()
    assert len(together.param_groups) == 1


def test_auto_augment_and_random_erasing_knobs_build_torchvision_transforms():
    from torchvision.transforms import v2

    from lightcnn.data.cifar import CIFAR10DataModule, cifar_transforms
    from lightcnn.data.imagenet import imagenet_transforms

    tf = cifar_transforms((0.5,) * 3, (0.25,) * 3, True, auto_augment="autoaugment", random_erasing=0.3)
    kinds = [type(t) for t in tf.transforms]
    assert kinds.index(v2.AutoAugment) < kinds.index(v2.ToDtype) and kinds[-1] is v2.RandomErasing
    assert tf.transforms[kinds.index(v2.AutoAugment)].policy == v2.AutoAugmentPolicy.CIFAR10
    plain = cifar_transforms((0.5,) * 3, (0.25,) * 3, True)
    assert not {v2.AutoAugment, v2.RandomErasing} & {type(t) for t in plain.transforms}
    inet = imagenet_transforms("inception", 32, 36, auto_augment="randaugment", random_erasing=0.25)
    assert {v2.RandAugment, v2.RandomErasing} <= {type(t) for t in inet.transforms}
    assert v2.RandAugment not in {type(t) for t in imagenet_transforms("none", 32, 36).transforms}
    with pytest.raises(ValueError, match="need augment=true"):
        CIFAR10DataModule(augment=False, auto_augment="randaugment")


def test_ema_callback_validates_and_ends_on_the_averaged_weights(tmp_path):
    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("this Lightning has no EMAWeightAveraging")
    cli = main([DIGITS, "--run_root", str(tmp_path), "--trainer.callbacks+",
                "lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.5",
                *SHORT, "--test_after_fit", "false", *NO_LOG])
    ema = next(cb for cb in cli.trainer.callbacks if isinstance(cb, callbacks.EMAWeightAveraging))
    averaged = dict(ema._average_model.module.named_parameters())
    for name, p in cli.model.named_parameters():
        torch.testing.assert_close(p, averaged[name], rtol=0, atol=0)


# --- 5. logging -----------------------------------------------------------------------------------------------


def test_run_folder_holds_metrics_csv_full_config_params_and_macs(user_pkg, tmp_path):
    cli = main([DIGITS, "--run_root", str(tmp_path), "--model.model", "mynets:tiny", *SHORT, *CSV_LOG, *QUIET,
                "--trainer.enable_model_summary", "true"])
    run = _run_dir(cli)
    assert (run / "metrics.csv").is_file() and not (tmp_path / "elsewhere").exists()
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    macs = 4 * 9 * 32 * 32 + 4 * 10  # conv3x3 1->4 on 32x32, linear 4->10
    assert hparams["model/macs"] == macs and hparams["model/params"] == 4 * 9 + 4 + 40 + 10
    assert hparams["model/optimizer/init_args/lr"] == 0.05 and hparams["data/init_args/batch_size"] == 32
    assert hparams["trainer/max_epochs"] == 1 and hparams["data/global_batch"] == 32
    from lightning.pytorch.utilities.model_summary import ModelSummary

    assert ModelSummary(cli.model).total_flops == 2 * macs * 1  # Lightning's summary counts the same


def test_a_resumed_run_appends_to_its_metrics_csv(tmp_path):
    short = [DIGITS, "--run_root", str(tmp_path), "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
             "1", "--test_after_fit", "false", *CSV_LOG, *QUIET]
    first = main([*short, "--trainer.max_epochs", "1"])
    run = _run_dir(first)
    main([*short, "--trainer.max_epochs", "2", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    with open(run / "metrics.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc1")]
    assert epochs == [0, 1]


def test_wandb_files_go_to_the_run_folder(tmp_path):
    from lightning.pytorch import Trainer

    from lightcnn.training.research import adopt_run_folder
    from lightcnn.training.wandb_utils import WandbLogger

    logger = WandbLogger(project="x", save_dir=str(tmp_path / "runs"))
    trainer = Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False)
    adopt_run_folder(trainer, str(tmp_path / "run1"), {"model": {"model": "lenet5"}})
    assert logger.save_dir == str(tmp_path / "run1") and logger._wandb_init["dir"] == str(tmp_path / "run1")
    assert [type(lg).__name__ for lg in trainer.loggers] == ["WandbLogger", "RunCSVLogger"]
    assert Path(trainer.loggers[1].log_dir) == tmp_path / "run1"


# --- 6. sweeps and results -------------------------------------------------------------------------------------


def test_runs_tabulates_finished_runs_by_their_differing_config(tmp_path, capsys):
    for lr in ("0.05", "0.02"):
        main([DIGITS, "--run_root", str(tmp_path), "--model.optimizer.init_args.lr", lr, *SHORT, *NO_LOG])
    text = runs_cli.main([str(tmp_path), "--csv", str(tmp_path / "t.csv"), "--sort", "test/acc1"])
    header = text.splitlines()[0]
    assert "model/optimizer/lr" in header and "test/acc1" in header and "max_epochs" not in header
    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model/optimizer/lr"] for r in rows) == ["0.02", "0.05"]
    for r in rows:
        saved = json.loads((tmp_path / r["run"] / "test_metrics.json").read_text())
        assert float(r["test/acc1"]) == round(saved["test/acc1"], 4)


def test_wandb_sweep_parameters_are_cli_keys(capsys):
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / "lenet5_digits_lr.yaml").read_text())
    assert sweep["command"][2:5] == ["-m", "lightcnn.fit", "experiments/lenet5_digits.yaml"]
    args = [f"--{k}={v['values'][-1]}" for k, v in sweep["parameters"].items()]  # as W&B's ${args}
    with pytest.raises(SystemExit) as e:
        main([DIGITS, *args, "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["optimizer"]["init_args"]["lr"] == 0.1
    assert printed["model"]["optimizer"]["init_args"]["weight_decay"] == 0.0005


@pytest.mark.slow
def test_shell_sweep_runs_the_grid_and_tabulates_it(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, ROOT=str(tmp_path / "sweep"), LRS="0.05 0.02", WDS="0", WANDB_MODE="disabled",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "experiments/sweeps/lenet5_digits_lr.sh", *SHORT, *NO_LOG], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "sweep" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model/optimizer/lr"] for r in rows) == ["0.02", "0.05"]
    assert sorted(Path(r["run"]).parts[0] for r in rows) == ["lr0.02_wd0", "lr0.05_wd0"]


# --- 8. guard rails ---------------------------------------------------------------------------------------------


def test_imagenet_stem_on_small_images_warns_naming_the_cifar_stem(tmp_path):
    with pytest.warns(UserWarning, match=r"resnet18 expects 224x224 .* gives 32x32.*\{stem: cifar\}"):
        main([DIGITS, "--run_root", str(tmp_path), "--model.model", "resnet18", "--model.optimizer.init_args.lr",
              "0.0", "--data", "lightcnn.data.SyntheticDataModule", "--data.image_size", "32", "--data.num_classes",
              "10", "--data.num_samples", "4", "--data.batch_size", "2", "--trainer.max_steps", "1",
              "--trainer.limit_val_batches", "1", "--test_after_fit", "false", *NO_LOG])


def test_accumulation_logs_the_effective_global_batch(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        main([DIGITS, "--run_root", str(tmp_path), "--trainer.accumulate_grad_batches", "4", *SHORT,
              "--test_after_fit", "false", *NO_LOG])
    assert "effective global batch 128 per optimiser step (batch_size 32 x accumulate_grad_batches 4)" in caplog.text


def test_num_workers_never_exceeds_usable_cpus(monkeypatch):
    from lightcnn.data import DigitsDataModule

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert DigitsDataModule(num_workers=8).num_workers == 2
    assert DigitsDataModule(num_workers=1).num_workers == 1


def test_research_doc_shows_each_command():
    doc = (ROOT / "docs" / "research.md").read_text()
    for command in ("--model.model mypkg.nets:", "--model mypkg.", "--model.init_weights", "mixup_alpha",
                    "python -m lightcnn.predict", "python -m lightcnn.runs", "wandb sweep", "EMAWeightAveraging",
                    "weight_decay_norm_bias"):
        assert command in doc, command
