"""The lightcnn command line: LightningCLI over `ClassifierModule` and any lightcnn datamodule.

`lightcnn.fit` and `lightcnn.test` are thin faces of `main` here. What this adds to LightningCLI:
- the experiment file is a positional argument (`python -m lightcnn.fit experiments/x.yaml`);
- every recipe inherits `recipe_defaults.yaml` (seed, logger, a last-checkpoint callback), LightningCLI's
  `default_config_files`, and holds only what its paper sets;
- each fit gets a run folder `RUN_ROOT/NAME/TIMESTAMP/` (NAME defaults to the experiment file's name)
  holding the resolved `config.yaml` and `checkpoints/`; the folder is chosen on rank 0 and broadcast,
  so every DDP process agrees on it however it was launched (Lightning, torchrun, SLURM);
- the data decides the classifier's `num_classes` and `in_chans` (linked arguments); the network's
  `default_cfg` decides the data's input size and normalisation where the recipe does not
  (`lightcnn/data/base.py`);
- `--test_weights best` tests the best validation checkpoint after training instead of the final weights;
- W&B (`wandb_utils.py`): with no credentials the run logs offline and says how to sync it;
  `WANDB_MODE=disabled` turns it off; `wandb.finish()` always runs, also after an error;
- a misspelt key is an error naming the closest accepted keys (`key_hints.py`);
- the reliability contract (docs/reliability.md; `checkpoint.py`, `reliability.py`): atomic, checksummed
  checkpoints; `--ckpt_path last`; a diverged run, SIGTERM and Ctrl-C end with exit 1, 143 and 130; an error
  the user can fix is one line and exit 2; a SLURM job requeued by Lightning continues in its run folder.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import tempfile
import warnings
from datetime import datetime
from pathlib import Path
from typing import Literal, NoReturn, Optional, Union, get_args

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightcnn.data.base import ClassificationDataModule
from lightcnn.ops._library import KernelUnavailableError
from lightcnn.training import reliability
from lightcnn.training.checkpoint import AtomicCheckpointIO, CheckpointError, NonFiniteLossError
from lightcnn.training.key_hints import key_hint
from lightcnn.training.module import ClassifierModule
from lightcnn.training.reliability import EXIT_SIGINT, EXIT_SIGTERM, RunGuard
from lightcnn.training.research import DEFAULT_MODULE, adopt_run_folder, defer_wandb_start, model_subclass_mode
from lightcnn.training.wandb_utils import default_wandb_mode, finish_wandb, wandb_run_id_file


def _run_dir_of(ckpt_path: str | None) -> Path | None:
    """The run folder of a checkpoint saved by a fit as RUN/checkpoints/*.ckpt, or as RUN/hpc_ckpt_N.ckpt by
    Lightning's SLURM requeue (RUN holds config.yaml)."""
    if not ckpt_path or ckpt_path in ("best", "last", "hpc"):
        return None
    ckpt = Path(ckpt_path)
    if ckpt.name.startswith("hpc_ckpt_"):
        run = ckpt.parent
    elif ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
    else:
        return None
    return run if (run / "config.yaml").is_file() else None


class SaveRunConfig(SaveConfigCallback):
    """Make the run folder `run_root/name/TIMESTAMP`, save the resolved config there, point checkpoints
    at its `checkpoints/`, and send the config to W&B. Resuming from RUN/checkpoints/X.ckpt keeps RUN and
    saves the resumed run's config as RUN/config-resumed-TIMESTAMP.yaml."""

    run_dir: str | None = None
    created: list[Path] = []  # what this process wrote (removed again if the run fails before any checkpoint)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        run_dir, config_name, self.created = None, self.config_filename, []
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
                missing = [p for p in (path, *path.parents) if not p.exists()]
                path.mkdir(parents=True)
                self.created += missing
            run_dir = str(path)
        run_dir = trainer.strategy.broadcast(run_dir)  # every rank must write checkpoints to the same place
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.join(run_dir, "checkpoints")
        # Lightning's SLURM requeue saves hpc_ckpt_N.ckpt in default_root_dir and resumes from there: keep
        # it in the run folder (the requeued job finds the folder again, `reliability.slurm_requeued_run`).
        trainer._default_root_dir = run_dir
        self.run_dir = run_dir
        adopt_run_folder(trainer, run_dir, json.loads(self.parser.dump(self.config, format="json")))
        if trainer.is_global_zero:
            config_file = Path(run_dir) / config_name
            self.parser.save(self.config, str(config_file))
            self.created.insert(0, config_file)
            job = reliability.slurm_job_id()
            if job is not None:
                (Path(run_dir) / reliability.SLURM_MARKER).write_text(job + "\n")
                self.created.insert(0, Path(run_dir) / reliability.SLURM_MARKER)
            self.save_config(trainer, pl_module, stage)
            rank_zero_info(f"lightcnn: run folder {run_dir} (config.yaml, checkpoints/)")
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = json.loads(self.parser.dump(self.config, format="json"))
                logger.experiment.config.update({"run_dir": self.run_dir, "cli_config": config}, allow_val_change=True)
                # A resumed or requeued run logs to the same W&B run (`LightCNNCLI.before_instantiate_classes`).
                wandb_run_id_file(self.run_dir).write_text(logger.experiment.id + "\n")

    def remove_if_unused(self) -> None:
        """After a failed start or resume: remove what `setup` wrote, unless a checkpoint was saved since."""
        configs = [p for p in self.created if p.suffix == ".yaml" and p.is_file()]
        if not self.run_dir or not configs:
            return
        run, since = Path(self.run_dir), configs[0].stat().st_mtime
        saved = [*run.glob("checkpoints/*.ckpt"), *run.glob("hpc_ckpt_*.ckpt")]
        if any(p.stat().st_mtime >= since for p in saved):
            return
        for path in self.created:  # files first, then the folders it made, deepest first
            if path.is_file():
                path.unlink()
            elif path.is_dir():
                for folder in (path / "checkpoints", path):
                    try:
                        folder.rmdir()  # only an empty folder: nothing but what this run made
                    except OSError:
                        pass


# The trainer block every recipe shares (seed, logger, last-checkpoint callback), read before the experiment file.
RECIPE_DEFAULTS = Path(__file__).with_name("recipe_defaults.yaml")


class _Parser(LightningArgumentParser):
    """Adds to a wrong-key error the closest accepted keys and the list of the keys accepted there, and says a
    value outside a knob's choices in one line."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(_choices_error(message) or message + key_hint(self, message), ex)


def _choices_error(message: str) -> str | None:
    """jsonargparse's several lines for a value outside a `Literal[...]` (or `Literal[...] | None`) knob, as
    one: `--model.impl: 'kernal' is not one of 'auto', 'kernel', 'reference' (or null)`; None for another error."""
    key = re.search(r'Parser key "([\w.]+)"', message)
    choices = re.findall(r"Literal\[([^\]]*)\]", message)
    value = re.search(r"(?:Given|Got) value: (.*)", message)
    if not (key and choices and value) or len(set(choices)) != 1:
        return None
    optional = "NoneType" in message
    return (f"--{key.group(1)}: {value.group(1).strip()!r} is not one of {choices[0]}"
            + (" (or null)" if optional else ""))


class LightCNNCLI(LightningCLI):
    """LightningCLI for lightcnn (see the module docstring). `stage` is "fit" or "test"."""

    def __init__(self, args: list[str], stage: Literal["fit", "test"] = "fit", experiment_name: str = "lightcnn"):
        self.stage, self.experiment_name = stage, experiment_name
        self.guard = RunGuard()
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
                           "allow_abbrev": False, "default_config_files": [str(RECIPE_DEFAULTS)]},
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
        _int_before_float(parser)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Every recipe gets atomic, checksummed checkpoints and the run guard, with no YAML change.
        config = self._get(self.config_init, "trainer", default={})
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        return super().instantiate_trainer(plugins=plugins, callbacks=[*callbacks, self.guard], **kwargs)

    def before_instantiate_classes(self) -> None:
        if self.stage == "test" and not self.config.ckpt_path:
            self.parser.error("python -m lightcnn.test needs --ckpt_path PATH/TO/CHECKPOINT.ckpt")
        if self.stage == "test":  # the checkpoint holds the weights: a run's starting weights are not read again
            (self.config.model.init_args if self.subclass_mode_model else self.config.model).init_weights = None
        configs = self.config.get("config") or []
        config_file = configs[-1].absolute if configs else None
        requeued = reliability.slurm_requeued_run(self.config.run_root, self.config.name) if self.stage == "fit" \
            else None
        if requeued is not None and reliability.resume_point(requeued):  # SLURM requeued this job: continue
            self.config.ckpt_path = reliability.resume_point(requeued)
            rank_zero_info(f"lightcnn: SLURM requeued job {reliability.slurm_job_id()}: resuming {requeued} from "
                           f"{self.config.ckpt_path}")
        self.config.ckpt_path = reliability.resolve_ckpt_path(self.config.ckpt_path, self.stage, self.config.run_root,
                                                              self.config.name, config_file)
        if self.stage == "test":  # a test writes no checkpoints
            self.config.trainer.enable_checkpointing = False
        if self.config.trainer.enable_checkpointing is False:  # nor the checkpoint callback recipes inherit
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
        # A W&B run without a name is named after the experiment; a resumed run logs to its W&B run again.
        resumed = _run_dir_of(self.config.ckpt_path) if self.stage == "fit" else None
        loggers = self.config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not getattr(logger, "class_path", "").endswith("WandbLogger"):
                continue
            if not logger.init_args.get("name"):
                logger.init_args.name = self.config.name
            if resumed is not None and wandb_run_id_file(resumed).is_file() and not logger.init_args.get("id"):
                logger.init_args.id = wandb_run_id_file(resumed).read_text().strip()
                logger.init_args.resume = "allow"
            _check_writable(logger.init_args.get("save_dir") or ".", "the W&B logger's save_dir "
                            "(--trainer.logger.init_args.save_dir)", self.parser)
        if self.stage == "fit":
            _check_writable(self.config.run_root, "--run_root", self.parser)


def _int_before_float(parser: LightningArgumentParser) -> None:
    """Lightning types `limit_*_batches` as a float-or-int union, and jsonargparse tries the float first, so
    `--trainer.limit_train_batches 1` became 1.0 (the whole epoch). Try the int first: 1 is one batch."""
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                "val_check_interval"):
        action = parser._option_string_actions.get(f"--trainer.{key}")
        hint = getattr(action, "_typehint", None)
        args = get_args(hint)
        if int in args and float in args and args.index(float) < args.index(int):
            action._typehint = Union[tuple(sorted(args, key=lambda t: t is not int))]


def _check_writable(folder: str, what: str, parser: LightningArgumentParser) -> None:
    """A one-line error now, rather than a traceback (or a Union-type dump) once the run has started."""
    path = Path(folder)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        parser.error(f"{what} {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        parser.error(f"{what} {folder} is not writable ({existing}: {e.strerror}): choose another folder")


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


def _rank_zero() -> bool:
    # Lightning sets the rank once the strategy knows it; before that it reads RANK, LOCAL_RANK, SLURM_PROCID.
    return getattr(rank_zero_only, "rank", 0) == 0


def _user_error(stage: str, error: BaseException, code: int = 2) -> NoReturn:
    """End the command with the message of a mistake in the config or the data, not a traceback (once, from
    rank 0, under DDP). LIGHTCNN_TRACEBACK=1 shows the traceback as well."""
    if os.environ.get("LIGHTCNN_TRACEBACK") == "1":
        raise error
    message = str(error).strip() or type(error).__name__
    if _rank_zero():
        print(f"lightcnn.{stage}: error: {message}", file=sys.stderr)
    raise SystemExit(code) from error


# Errors raised inside trainer.fit/test that the user can fix (configuration, files, data): one line, exit 2.
_USER_ERRORS = (ValueError, TypeError, MisconfigurationException, FileNotFoundError, NotADirectoryError,
                PermissionError, IsADirectoryError, KernelUnavailableError)


def _stopped(stage: str, cli: LightCNNCLI | None, how: str, code: int) -> NoReturn:
    guard = cli.guard if cli is not None else None
    saved = guard.saved if guard is not None else None
    text = f"lightcnn.{stage}: stopped by {how}"
    if saved:
        text += f"; resumable checkpoint {saved} (continue with --ckpt_path last)"
    if _rank_zero():
        print(text, file=sys.stderr)
    raise SystemExit(code)


def _fit_or_test(cli: LightCNNCLI, stage: str) -> None:
    trainer, model, data, config = cli.trainer, cli.model, cli.datamodule, cli.config
    if config.ckpt_path and config.ckpt_path not in ("best", "hpc"):
        module_config = config.model.init_args if cli.subclass_mode_model else config.model
        optimizer = module_config.optimizer.class_path if stage == "fit" and module_config.get("optimizer") else None
        reliability.check_checkpoint_fits(config.ckpt_path, model, module_config.model, optimizer,
                                          resume=stage == "fit")
    if stage == "fit":
        defer_wandb_start(trainer)  # W&B starts in the run folder (research.py)
        trainer.fit(model, datamodule=data, ckpt_path=config.ckpt_path)
        # Lightning's SLURM checkpoints are superseded once the fit is done (and a test must not load them).
        for hpc in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"):
            if trainer.is_global_zero:
                hpc.unlink()
        if config.test_after_fit and not trainer.interrupted:
            trainer.test(model, datamodule=data, ckpt_path="best" if config.test_weights == "best" else None)
    else:
        trainer.test(model, datamodule=data, ckpt_path=config.ckpt_path)


def _save_config_callback(cli: LightCNNCLI | None) -> SaveRunConfig | None:
    if cli is None:
        return None
    return next((cb for cb in cli.trainer.callbacks if isinstance(cb, SaveRunConfig)), None)


def main(args: list[str] | None = None, stage: Literal["fit", "test"] = "fit") -> LightCNNCLI:
    args, name = _positional_config(list(sys.argv[1:] if args is None else args))
    config_files = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--config")]
    config_files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    default_wandb_mode()
    cli = None
    try:
        try:
            for config_file in config_files:
                reliability.check_config_file(config_file)
            cli = LightCNNCLI(args, stage=stage, experiment_name=name)
        except (ValueError, TypeError) as e:  # e.g. an unknown model name or knob: the registry's message
            _user_error(stage, e)
        try:
            with reliability.SigtermWatchdog(lambda: cli.trainer):
                _fit_or_test(cli, stage)
        except BaseException:
            saver = _save_config_callback(cli)
            if saver is not None and _rank_zero():
                saver.remove_if_unused()
            reliability.end_other_ranks(cli.trainer)  # no rank stays behind, stopped or blocked
            raise
    except NonFiniteLossError as e:
        _user_error(stage, e, code=1)
    except SIGTERMException:
        _stopped(stage, cli, "SIGTERM", EXIT_SIGTERM)
    except KeyboardInterrupt:
        _stopped(stage, cli, "Ctrl-C (SIGINT)", EXIT_SIGINT)
    except SystemExit:
        if cli is not None and cli.guard.stopped_by == "SIGINT":  # Lightning turns Ctrl-C into exit(1)
            _stopped(stage, cli, "Ctrl-C (SIGINT)", EXIT_SIGINT)
        raise
    except CheckpointError as e:
        _user_error(stage, e)
    except OSError as e:
        if isinstance(e, _USER_ERRORS) or e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            _user_error(stage, e)  # missing data says how to get it; a full disk keeps the last checkpoint
        raise
    except _USER_ERRORS as e:
        _user_error(stage, e)
    finally:
        finish_wandb()
    return cli
