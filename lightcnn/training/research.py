"""What the command line adds for research runs (called from `cli.py`):

- `model_subclass_mode(args)`: `--model pkg.module.MyModule` (a subclass of `ClassifierModule`, to change
  the loss or the step) switches LightningCLI to subclass mode for this command only, with
  `ClassifierModule` as the default class, so every recipe written as `model: {model: ..., optimizer: ...}`
  keeps working unchanged; a config saved by such a run (`model: {class_path: ..., init_args: ...}`)
  switches it too.
- `adopt_run_folder(trainer, run_dir, config)`: every file of a run under its run folder: W&B's files go to
  RUN/wandb, a CSV logger writes RUN/metrics.csv (added when the run logs at all), and the whole resolved
  configuration is logged as flat hyperparameters to every logger (W&B gets it nested from `cli.py`).
  Lightning starts every logger's experiment before any callback's `setup`, i.e. before the run folder
  exists; `defer_wandb_start(trainer)` (called before `fit`) holds W&B's start back until then.
"""
from __future__ import annotations

import csv
import functools
import os
import re
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

_CLASS_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+\Z")
DEFAULT_MODULE = "lightcnn.training.module.ClassifierModule"


def model_subclass_mode(args: list[str]) -> bool:
    """Whether the arguments name a LightningModule class for `--model`, directly or in a config file."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("--model", "-c", "--config") and i + 1 < len(args) else None
        if arg.startswith(("--model=", "--config=")):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        if arg.startswith("--model") and _CLASS_PATH.match(value) and not value.endswith((".yaml", ".yml")):
            return True
        if arg.startswith("--model") and "class_path" in value:
            return True
        if arg.startswith(("-c", "--config")) and _config_names_module_class(value):
            return True
    return False


def _config_names_module_class(path: str) -> bool:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # LightningCLI reports an unreadable config itself
    model = config.get("model") if isinstance(config, dict) else None
    return isinstance(model, dict) and "class_path" in model


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"optimizer": {"init_args": {"lr": 0.1}}}} -> {"model/optimizer/init_args/lr": 0.1}."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}/"))
        return out
    if isinstance(config, list) and any(isinstance(v, dict) for v in config):
        out = {}
        for i, value in enumerate(config):
            out.update(flatten(value, f"{prefix}{i}/"))
        return out
    return {prefix.rstrip("/"): config}


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):  # a resumed run: keep the columns of the rows before
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def _check_log_dir_exists(self) -> None:
        pass  # the run folder holds the run's other files, and a resumed run appends to its metrics.csv


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing RUN/metrics.csv and RUN/hparams.yaml; a resumed run appends its rows
    (Lightning's own deletes the metrics of a folder that is not empty)."""

    def __init__(self, run_dir: str, **kwargs):
        super().__init__(run_dir, name="", version="", **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self._root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


@functools.cache
def _deferred(cls: type) -> type:
    """`cls` (a WandbLogger class) whose `experiment` does not exist until the run folder is known, so that
    Lightning's setup (`hasattr(logger, "experiment")`) does not start the W&B run in the recipe's save_dir."""

    class Deferred(cls):
        @property
        def experiment(self):
            if not getattr(self, "_run_folder_known", False):
                raise AttributeError("the W&B run starts in the run folder, once it is made")
            return cls.experiment.fget(self)

    Deferred.__name__, Deferred.__qualname__ = cls.__name__, cls.__qualname__
    return Deferred


def defer_wandb_start(trainer) -> None:
    """Start the W&B runs of `trainer` in the run folder that `adopt_run_folder` gives them."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            logger.__class__ = _deferred(type(logger))


def adopt_run_folder(trainer, run_dir: str, config: dict[str, Any] | None) -> None:
    """Point the run's loggers at `run_dir` (W&B before its run starts; a CSV logger writing
    RUN/metrics.csv), and log the resolved `config` as flat hyperparameters to every logger but W&B."""
    loggers: list[Logger] = list(trainer.loggers)
    if not loggers:
        return  # `logger: false`: the run logs nothing
    for i, logger in enumerate(loggers):
        if isinstance(logger, WandbLogger) and logger._experiment is None:
            # Lightning's WandbLogger has no public setter; the run has not started, so this is where it goes.
            logger._save_dir = run_dir
            logger._wandb_init["dir"] = run_dir
        if isinstance(logger, WandbLogger):
            logger._run_folder_known = True
        elif isinstance(logger, CSVLogger):
            loggers[i] = RunCSVLogger(run_dir, prefix=logger._prefix,
                                      flush_logs_every_n_steps=logger._flush_logs_every_n_steps)
    if not any(isinstance(logger, CSVLogger) for logger in loggers):
        loggers.append(RunCSVLogger(run_dir))
    trainer.loggers = loggers
    if config:
        flat = flatten(config)
        for logger in loggers:
            if not isinstance(logger, WandbLogger):
                logger.log_hyperparams(flat)
