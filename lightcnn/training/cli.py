"""The lightcnn command line: LightningCLI over `ClassifierModule` and any lightcnn datamodule.

`lightcnn.fit` and `lightcnn.test` are thin faces of `main` here. What this adds to LightningCLI:
- the experiment file is a positional argument (`python -m lightcnn.fit experiments/x.yaml`);
- each fit gets a run folder `RUN_ROOT/NAME/TIMESTAMP/` (NAME defaults to the experiment file's name)
  holding the resolved `config.yaml` and `checkpoints/`; the folder is chosen on rank 0 and broadcast,
  so every DDP process agrees on it however it was launched (Lightning, torchrun, SLURM);
- the data decides the classifier's `num_classes` and `in_chans` (linked arguments); the network's
  `default_cfg` decides the data's input size and normalisation where the recipe does not
  (`lightcnn/data/base.py`);
- `--test_weights best` tests the best validation checkpoint after training instead of the final weights;
- W&B (`wandb_utils.py`): with no credentials the run logs offline and says how to sync it;
  `WANDB_MODE=disabled` turns it off; `wandb.finish()` always runs, also after an error;
- a misspelt key is an error naming the closest accepted keys (`key_hints.py`).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Literal, NoReturn, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from lightcnn.data.base import ClassificationDataModule
from lightcnn.training.key_hints import key_hint
from lightcnn.training.module import ClassifierModule
from lightcnn.training.research import DEFAULT_MODULE, adopt_run_folder, defer_wandb_start, model_subclass_mode
from lightcnn.training.wandb_utils import default_wandb_mode, finish_wandb


def _run_dir_of(ckpt_path: str | None) -> Path | None:
    """The run folder of a checkpoint saved as RUN/checkpoints/*.ckpt by a fit (RUN holds config.yaml)."""
    if not ckpt_path:
        return None
    ckpt = Path(ckpt_path)
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


class SaveRunConfig(SaveConfigCallback):
    """Make the run folder `run_root/name/TIMESTAMP`, save the resolved config there, point checkpoints
    at its `checkpoints/`, and send the config to W&B. Resuming from RUN/checkpoints/X.ckpt keeps RUN and
    saves the resumed run's config as RUN/config-resumed-TIMESTAMP.yaml."""

    run_dir: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        run_dir, config_name = None, self.config_filename
        if trainer.is_global_zero:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            resumed = _run_dir_of(self.config.ckpt_path)
            if resumed is not None:  # resuming a run: keep its folder, add this resumption's config
                path, config_name = resumed, f"config-resumed-{stamp}.yaml"
            else:
                root = Path(self.config.run_root) / self.config.name
                path, i = root / stamp, 1
                while path.exists():  # two runs started in the same second
                    path, i = root / f"{stamp}-{i}", i + 1
                path.mkdir(parents=True)
            run_dir = str(path)
        run_dir = trainer.strategy.broadcast(run_dir)  # every rank must write checkpoints to the same place
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(run_dir, "checkpoints")
        self.run_dir = run_dir
        adopt_run_folder(trainer, run_dir, json.loads(self.parser.dump(self.config, format="json")))
        if trainer.is_global_zero:
            self.parser.save(self.config, os.path.join(run_dir, config_name))
            self.save_config(trainer, pl_module, stage)
            rank_zero_info(f"lightcnn: run folder {run_dir} (config.yaml, checkpoints/)")
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = json.loads(self.parser.dump(self.config, format="json"))
                logger.experiment.config.update({"run_dir": self.run_dir, "cli_config": config}, allow_val_change=True)


class _Parser(LightningArgumentParser):
    """Adds to a wrong-key error the closest accepted keys and the list of the keys accepted there."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(message + key_hint(self, message), ex)


class LightCNNCLI(LightningCLI):
    """LightningCLI for lightcnn (see the module docstring). `stage` is "fit" or "test"."""

    def __init__(self, args: list[str], stage: Literal["fit", "test"] = "fit", experiment_name: str = "lightcnn"):
        self.stage, self.experiment_name = stage, experiment_name
        # `main` hands over sys.argv itself (with the positional experiment file turned into --config).
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        super().__init__(
            ClassifierModule,
            ClassificationDataModule,
            subclass_mode_model=model_subclass_mode(args),  # `--model pkg.module.MyModule` (research.py)
            subclass_mode_data=True,
            parser_class=_Parser,
            save_config_callback=SaveRunConfig if stage == "fit" else None,
            run=False,
            args=args,
            auto_configure_optimizers=False,
            # allow_abbrev=False: argparse would otherwise take a misspelt prefix (`--trainer.max_epoch`) as a key.
            parser_kwargs={"prog": f"python -m lightcnn.{stage}", "description": _DESCRIPTIONS[stage],
                           "allow_abbrev": False},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        model = "model.init_args" if self.subclass_mode_model else "model"
        if self.subclass_mode_model:  # a recipe's `model:` without class_path is ClassifierModule's init_args
            parser.set_defaults({"model": {"class_path": DEFAULT_MODULE}})
        parser.link_arguments("data.num_classes", f"{model}.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", f"{model}.in_chans", apply_on="instantiate")
        parser.add_argument("--name", type=str, default=self.experiment_name,
                            help="experiment name: runs go to RUN_ROOT/NAME/TIMESTAMP "
                                 "(default: the config file's name)")
        parser.add_argument("--run_root", type=str, default="runs", help="folder of all run folders")
        parser.add_argument("--num_threads", type=Optional[int], default=None,
                            help="CPU threads per process for intra-op parallelism (torch.set_num_threads); "
                                 "1 is fastest for tiny models on a busy CPU. Default: torch's choice")
        # Both commands take the same keys, so that the config.yaml saved by a fit is a valid test config.
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="fit: resume from this checkpoint (e.g. RUN/checkpoints/last.ckpt); "
                                 "test: the checkpoint to evaluate (required)")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit: after training, evaluate the weights chosen by --test_weights on the test split")
        parser.add_argument("--test_weights", type=Literal["final", "best"], default="final",
                            help="fit: the weights the test after training evaluates: the final ones, or the "
                                 "checkpoint with the best monitored validation metric (needs a ModelCheckpoint "
                                 "callback with `monitor`; the protocol of papers that report the test error "
                                 "at the best validation error)")

    def before_instantiate_classes(self) -> None:
        if self.stage == "test" and not self.config.ckpt_path:
            self.parser.error("python -m lightcnn.test needs --ckpt_path PATH/TO/CHECKPOINT.ckpt")
        if self.stage == "test":  # the checkpoint holds the weights: a run's starting weights are not read again
            (self.config.model.init_args if self.subclass_mode_model else self.config.model).init_weights = None
        if self.stage == "test":  # a test writes no checkpoints
            self.config.trainer.enable_checkpointing = False
            self.config.trainer.callbacks = [
                cb for cb in self.config.trainer.callbacks or []
                if not getattr(cb, "class_path", "").endswith("ModelCheckpoint")
            ]
        if self.stage == "fit" and self.config.test_after_fit and self.config.test_weights == "best" and not any(
            getattr(cb, "class_path", "").endswith("ModelCheckpoint") and cb.init_args.get("monitor")
            for cb in self.config.trainer.callbacks or []
        ):
            self.parser.error("--test_weights best needs a ModelCheckpoint callback that monitors a validation "
                              "metric, e.g. init_args: {monitor: val/acc1, mode: max}")
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        # A W&B run without a name is named after the experiment.
        loggers = self.config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", "").endswith("WandbLogger") and not logger.init_args.get("name"):
                logger.init_args.name = self.config.name


_DESCRIPTIONS = {
    "fit": "Train a network with an experiment recipe: python -m lightcnn.fit experiments/NAME.yaml [--key value ...]",
    "test": "Evaluate a checkpoint on the test split: python -m lightcnn.test CONFIG.yaml --ckpt_path CKPT",
}


def _positional_config(args: list[str]) -> tuple[list[str], str]:
    """`EXPERIMENT.yaml --k v` -> `--config EXPERIMENT.yaml --k v`, and the experiment's name."""
    if args and not args[0].startswith("-"):
        args = ["--config", args[0], *args[1:]]
    name = "lightcnn"
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            name = Path(args[i + 1]).stem
            break
        if a.startswith("--config="):
            name = Path(a.split("=", 1)[1]).stem
            break
    return args, name


def _user_error(stage: str, error: Exception) -> NoReturn:
    """End the command with the message of a mistake in the config or the data, not a traceback."""
    print(f"lightcnn.{stage}: error: {error}", file=sys.stderr)
    raise SystemExit(2) from error


def main(args: list[str] | None = None, stage: Literal["fit", "test"] = "fit") -> LightCNNCLI:
    args, name = _positional_config(list(sys.argv[1:] if args is None else args))
    default_wandb_mode()
    cli = None
    try:
        try:
            cli = LightCNNCLI(args, stage=stage, experiment_name=name)
        except (ValueError, TypeError) as e:  # e.g. an unknown model name or knob: the registry's message
            _user_error(stage, e)
        trainer, model, data, config = cli.trainer, cli.model, cli.datamodule, cli.config
        if stage == "fit":
            defer_wandb_start(trainer)  # W&B starts in the run folder (research.py)
            trainer.fit(model, datamodule=data, ckpt_path=config.ckpt_path)
            if config.test_after_fit and not trainer.interrupted:
                trainer.test(model, datamodule=data, ckpt_path="best" if config.test_weights == "best" else None)
        else:
            trainer.test(model, datamodule=data, ckpt_path=config.ckpt_path)
    except (FileNotFoundError, NotADirectoryError) as e:  # missing data: the message says how to get it
        _user_error(stage, e)
    finally:
        finish_wandb()
    return cli
