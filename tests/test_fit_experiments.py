"""Every experiment file parses, and builds its module, datamodule, optimiser and LR scheduler (no training).

One test per file, so a recipe whose model has not landed yet fails alone, naming its model.
"""
from pathlib import Path

import pytest
import torch

from lightcnn.models import is_model
from lightcnn.training.cli import LightCNNCLI

@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])  # the CLI gets its arguments from the test only


EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_there_is_an_experiment_per_paper_recipe():
    names = {p.stem for p in EXPERIMENTS}
    expected = {"lenet5_digits", "alexnet_imagenet", "zfnet_imagenet", "vgg16_imagenet", "googlenet_imagenet",
                "resnet50_imagenet", "resnet110_cifar10", "preact_resnet164_cifar10", "wrn28_10",
                "resnext29_8x64d_cifar10", "sd_resnet110_cifar10"}
    assert expected <= names, f"missing experiment files: {sorted(expected - names)}"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_builds(path, tmp_path):
    import yaml

    model_name = yaml.safe_load(path.read_text())["model"]["model"]
    assert is_model(model_name), f"{path.name}: model {model_name!r} is not registered (has its family landed?)"
    cli = LightCNNCLI(["--config", str(path), "--run_root", str(tmp_path), "--trainer.logger", "false"],
                      stage="fit", experiment_name=path.stem)
    data, module = cli.datamodule, cli.model
    assert module.num_classes == data.num_classes == module.net.num_classes
    assert module.net.in_chans == data.in_chans
    assert data.batch_size >= 1
    cfg = module.configure_optimizers()
    optimizer = cfg["optimizer"] if isinstance(cfg, dict) else cfg
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
