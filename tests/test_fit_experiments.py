"""Every experiment file parses, and builds its module, datamodule, optimiser and LR scheduler (no training).

One test per file, so a recipe whose model has not landed yet fails alone, naming its model.
"""
from pathlib import Path

import pytest
import torch

from lightcnn.models import is_model
from lightcnn.training.cli import RECIPE_DEFAULTS, LightCNNCLI
from tests.helpers import EXPERIMENTS, build_experiment


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])  # the CLI gets its arguments from the test only




def test_there_is_an_experiment_per_paper_recipe():
    names = {p.stem for p in EXPERIMENTS}
    expected = {"lenet5_digits", "alexnet_imagenet", "zfnet_imagenet", "vgg16_imagenet", "googlenet_imagenet",
                "resnet50_imagenet", "resnet110_cifar10", "preact_resnet164_cifar10", "wrn28_10_cifar10",
                "resnext29_8x64d_cifar10", "sd_resnet110_cifar10", "densenet_bc100_k12_cifar10",
                "densenet121_imagenet", "fractalnet20_cifar10", "nasnet_a_cifar10", "inception_v4_imagenet",
                "inception_resnet_v2_imagenet"}
    assert expected <= names, f"missing experiment files: {sorted(expected - names)}"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_builds(path, tmp_path):
    import yaml

    model_name = yaml.safe_load(path.read_text())["model"]["model"]
    assert is_model(model_name), f"{path.name}: model {model_name!r} is not registered (has its family landed?)"
    cli = build_experiment(path.stem, tmp_path)
    data, module = cli.datamodule, cli.model
    assert next(module.net.parameters()).is_meta
    assert module.num_classes == data.num_classes == module.net.num_classes
    assert module.net.in_chans == data.in_chans
    assert data.batch_size >= 1
    cfg = module.configure_optimizers()
    optimizer = cfg["optimizer"] if isinstance(cfg, dict) else cfg
    assert isinstance(optimizer, torch.optim.Optimizer)
    trainable = [p for p in module.parameters() if p.requires_grad]  # BN without scale keeps gamma frozen
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)


def _data_config(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["data"]


CIFAR_RECIPES = [p for p in EXPERIMENTS if "CIFAR" in _data_config(p)["class_path"]]


@pytest.mark.parametrize("path", CIFAR_RECIPES, ids=[p.stem for p in CIFAR_RECIPES])
def test_cifar_recipes_state_their_padding(path):
    assert "padding_mode" in _data_config(path)["init_args"], f"{path.name}: say which padding its paper used"


def test_zfnet_recipe_renormalises_filters_to_0_1_and_crops_the_central_square(tmp_path):
    from lightcnn.training import RenormalizeFilters

    cli = build_experiment("zfnet_imagenet", tmp_path)
    (renorm,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RenormalizeFilters)]
    assert renorm.radius == 0.1  # Zeiler & Fergus 2014, Sec. 3.1
    assert cli.datamodule.center_square and cli.datamodule.resize_size == 256


def test_alexnet_recipe_crops_the_central_square(tmp_path):
    data = build_experiment("alexnet_imagenet", tmp_path).datamodule
    assert data.center_square and (data.image_size, data.resize_size) == (227, 256)


def test_googlenet_recipe_is_the_bvlc_solver(tmp_path):
    cli = build_experiment("googlenet_imagenet", tmp_path)
    cfg = cli.model.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cli.datamodule.batch_size == 32 and cfg["lr_scheduler"]["interval"] == "step"
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 0.0002)
    assert (sched.step_size, sched.gamma) == (320000, 0.96)


def test_stochastic_depth_recipe_tests_the_best_validation_checkpoint_of_a_45k_5k_split(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = build_experiment("sd_resnet110_cifar10", tmp_path)
    assert cli.config.test_weights == "best"
    assert cli.datamodule.val_size == 5000  # of CIFAR-10's 50,000 training images: 45,000 are trained on
    (ckpt,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert ckpt.monitor == "val/acc1" and ckpt.mode == "max"


def test_every_recipe_names_callbacks_by_their_export():
    import yaml

    import lightcnn.training

    for path in [RECIPE_DEFAULTS, *EXPERIMENTS]:
        trainer = yaml.safe_load(path.read_text())["trainer"]
        for cb in [*(trainer.get("callbacks") or []), *(trainer.get("callbacks+") or [])]:
            module, _, name = cb["class_path"].rpartition(".")
            if module.startswith("lightcnn."):
                assert module == "lightcnn.training" and name in lightcnn.training.__all__, f"{path.name}: {cb}"


def test_recipes_hold_only_what_differs_from_the_shared_defaults():
    """The seed, the logger and the last-checkpoint callback are written once, in recipe_defaults.yaml; a recipe
    that adds a callback appends it (`callbacks+`), one that replaces the list keeps a ModelCheckpoint."""
    import yaml

    defaults = yaml.safe_load(RECIPE_DEFAULTS.read_text())
    assert defaults["seed_everything"] == 0
    assert defaults["trainer"]["logger"]["class_path"] == "lightcnn.training.WandbLogger"
    assert defaults["trainer"]["callbacks"] == [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]
    for path in EXPERIMENTS:
        recipe = yaml.safe_load(path.read_text())
        trainer = recipe["trainer"]
        assert "seed_everything" not in recipe and "logger" not in trainer, path.name
        for key, value in defaults["trainer"].items():
            assert trainer.get(key) != value, f"{path.name} repeats trainer.{key}"
        if "callbacks" in trainer:
            assert any(cb["class_path"].endswith("ModelCheckpoint") for cb in trainer["callbacks"]), path.name


@pytest.mark.parametrize("name, callbacks", [
    ("wrn28_10_cifar10", ["ModelCheckpoint"]),
    ("zfnet_imagenet", ["ModelCheckpoint", "RenormalizeFilters"]),
    ("sd_resnet110_cifar10", ["ModelCheckpoint"]),
])
def test_a_recipe_resolves_to_the_shared_trainer_block_plus_its_own(name, callbacks, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = build_experiment(name, tmp_path)
    config = cli.config
    assert config.seed_everything == 0 and config.trainer.accelerator == "auto"
    assert [cb.class_path.rpartition(".")[2] for cb in config.trainer.callbacks] == callbacks
    (ckpt,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert ckpt.save_last is True
    assert (ckpt.monitor, ckpt.mode) == (("val/acc1", "max") if name.startswith("sd_") else (None, "min"))
    # the logger too (build_experiment turns it off): parsed, not instantiated
    logger = cli.parser.parse_args(["--config", str(next(p for p in EXPERIMENTS if p.stem == name))]).trainer.logger
    assert logger.class_path == "lightcnn.training.WandbLogger"
    assert (logger.init_args.project, logger.init_args.save_dir) == ("lightcnn", "runs")


def test_enable_checkpointing_false_drops_the_inherited_checkpoint(tmp_path):
    digits = next(p for p in EXPERIMENTS if p.stem == "lenet5_digits")
    cli = LightCNNCLI(["--config", str(digits), "--run_root", str(tmp_path), "--trainer.logger", "false",
                       "--trainer.enable_checkpointing", "false"], stage="fit", experiment_name="lenet5_digits")
    assert cli.config.trainer.callbacks == [] and cli.trainer.checkpoint_callback is None


def test_model_impl_from_the_command_line_reaches_every_kernel_layer(tmp_path):
    from lightcnn.layers import LocalResponseNorm

    recipe = next(p for p in EXPERIMENTS if p.stem == "alexnet_imagenet")
    cli = LightCNNCLI(["--config", str(recipe), "--run_root", str(tmp_path), "--trainer.logger", "false",
                       "--model.impl", "reference"], stage="fit", experiment_name="alexnet_imagenet")
    assert [m.impl for m in cli.model.net.modules() if isinstance(m, LocalResponseNorm)] == ["reference"] * 2


@pytest.mark.parametrize("args, says", [
    (["--model.impl", "kernal"], "error: --model.impl: 'kernal' is not one of 'auto', 'kernel', 'reference' (or null)"),
    (["--model.impl", "kernel"], "lightcnn.fit: error: create('lenet5'): unknown argument 'impl' for LeNet5."),
    (["--model.impl", "kernel", "--model.model_kwargs", "{impl: reference}"],
     "lightcnn.fit: error: impl is given twice, as impl and as model_kwargs.impl: keep one"),
], ids=["not-a-choice", "model-without-kernels", "given-twice"])
def test_model_impl_from_the_command_line_is_checked_in_one_line(args, says, tmp_path, capsys):
    from lightcnn.training.cli import main

    digits = next(p for p in EXPERIMENTS if p.stem == "lenet5_digits")
    with pytest.raises(SystemExit) as e:
        main([str(digits), "--run_root", str(tmp_path), "--trainer.logger", "false", *args])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(says), last


def test_the_headline_command_runs_the_wide_resnet_recipe():
    """`python -m lightcnn.fit experiments/wrn28_10.yaml` (the short name) is the WRN-28-10 CIFAR-10 recipe."""
    short = EXPERIMENTS[0].parent / "wrn28_10.yaml"
    assert short.is_symlink() and short.resolve() == EXPERIMENTS[0].parent / "wrn28_10_cifar10.yaml"
