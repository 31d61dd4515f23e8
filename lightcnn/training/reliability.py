"""What makes a lightcnn run stop honestly (docs/reliability.md): the checks and the callback the CLI adds.

- `RunGuard` (a callback every fit and test gets): a non-finite training loss stops the fit with
  `NonFiniteLossError` before any checkpoint holds the diverged weights; SIGTERM (SLURM preemption,
  scancel, docker stop) saves a resumable `last.ckpt` before the run ends; checkpoints record the
  optimiser classes, so a resume with another optimiser is a one-line error.
- `resolve_ckpt_path`: `--ckpt_path last` is the newest `last.ckpt` of the experiment's runs (fit) or of
  the run folder that holds the config (test), or an error naming the checkpoints there are.
- `check_checkpoint_fits`: before a resume or a test, the checkpoint is verified and must hold the
  network (and, for a resume, the optimiser) the config asks for.
- `check_config_file`: an empty or malformed experiment file is an error naming the file.
- `slurm_requeued_run`: the run folder a requeued SLURM job continues in.
- `SigtermWatchdog`, `end_other_ranks`: SIGTERM or a failure ends every DDP rank, also one blocked in a
  collective.
"""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightcnn.training.checkpoint import CheckpointError, NonFiniteLossError, is_finite_state, load_checkpoint

EXIT_SIGINT = 128 + signal.SIGINT  # 130, the shell's code for a run ended by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class RunGuard(L.Callback):
    """Stops a diverged fit, saves a resumable checkpoint on SIGTERM, and records why a run stopped.

    `stopped_by` is None, "SIGTERM", "SIGINT" or "non-finite loss" once the run ended early;
    `saved` the checkpoint written on SIGTERM.
    """

    def __init__(self):
        self.stopped_by: str | None = None
        self.saved: str | None = None
        self.last_finite_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not torch.is_tensor(loss):
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank stops at the same step, or the others would wait for it
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.last_finite_step = trainer.global_step
            return
        self.stopped_by = "non-finite loss"
        raise NonFiniteLossError(
            f"the training loss is {loss.item() if loss.numel() == 1 else 'not finite'} at epoch "
            f"{trainer.current_epoch}, step {trainer.global_step} (the run diverged); no checkpoint holds the "
            "diverged weights: lower the learning rate (--model.optimizer.init_args.lr) or add warm-up, and "
            "resume from the last good checkpoint with --ckpt_path")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not is_finite_state(checkpoint.get("state_dict", {})):
            # Raising here keeps the previous file: ModelCheckpoint removes an old one only after the new save.
            self.stopped_by = "non-finite loss"
            raise NonFiniteLossError(
                f"the weights are not finite at epoch {trainer.current_epoch}, step {trainer.global_step} (the run "
                "diverged); the checkpoint was not written: lower the learning rate and resume from the last good "
                "checkpoint with --ckpt_path")
        checkpoint.setdefault("lightcnn", {})["optimizers"] = [_class_path(type(o)) for o in trainer.optimizers]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.stopped_by = "SIGINT"
        elif isinstance(exception, SIGTERMException):
            self.stopped_by = "SIGTERM"
            if trainer.state.fn == "fit" and trainer.checkpoint_callback is not None:
                callback = trainer.checkpoint_callback
                path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
                if is_finite_state(pl_module.state_dict()):
                    trainer.save_checkpoint(path)
                    self.saved = path


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_config_file(path: str | os.PathLike) -> None:
    """Raise ValueError naming `path` when it is empty or not valid YAML (jsonargparse would say neither)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read the experiment file {path}: {e.strerror}") from e
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"the experiment file {path} is not valid YAML{where}: {problem}") from e
    if content is None:
        raise ValueError(f"the experiment file {path} is empty: it needs at least `model:` and `data:` "
                         "(see experiments/lenet5_digits.yaml)")
    if not isinstance(content, dict):
        raise ValueError(f"the experiment file {path} must be a mapping of keys (model:, data:, trainer: ...), "
                         f"got a {type(content).__name__}")


def _newest(paths: list[Path]) -> Path:
    return max(paths, key=lambda p: p.stat().st_mtime)


def resolve_ckpt_path(ckpt_path: str | None, stage: str, run_root: str, name: str,
                      config_file: str | None) -> str | None:
    """`last` -> a real path (module docstring); any other value must be an existing file."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        if stage == "fit":
            where = Path(run_root) / name
            found = list(where.glob("*/checkpoints/last.ckpt"))
            if found:
                return str(_newest(found))
            others = sorted(where.glob("*/checkpoints/*.ckpt"))
            raise ValueError(f"--ckpt_path last: no run of '{name}' under {where} has a checkpoints/last.ckpt"
                             + ("; its checkpoints: " + ", ".join(map(str, others)) if others else
                                " (no checkpoints at all): start without --ckpt_path, or name another --run_root"
                                " or --name"))
        run = Path(config_file).parent if config_file else None
        last = run / "checkpoints" / "last.ckpt" if run else None
        if last is not None and last.is_file():
            return str(last)
        choices = sorted(run.glob("checkpoints/*.ckpt")) if run else []
        raise ValueError("--ckpt_path last: the config " + (f"{config_file} is not in a run folder with "
                         "checkpoints/last.ckpt" if config_file else "file is not given") + "; pass the checkpoint "
                         "to evaluate" + (": " + ", ".join(map(str, choices)) if choices else
                                          ", or test with the run's own RUN/config.yaml"))
    if ckpt_path in ("best", "hpc"):
        return ckpt_path  # Lightning's own names (they need a fit in the same process)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    return ckpt_path


def check_checkpoint_fits(ckpt_path: str, model: torch.nn.Module, model_name: str, optimizer_class: str | None,
                          resume: bool) -> None:
    """Verify the checkpoint file and that it holds this network (and, to resume, this optimiser).

    Raises `CheckpointError` with one line saying what the checkpoint holds and what the config asks for.
    """
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint (no state_dict); to start from its "
                              "weights use --model.init_weights")
    hparams = ckpt.get("hyper_parameters", {}) or {}
    held = hparams.get("model")
    state = ckpt["state_dict"]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if held is not None and held != model_name or missing or unexpected or shapes:
        holds = f"a {held}" if held is not None else "another network"
        if held is not None and hparams.get("model_kwargs"):
            holds += f" with model_kwargs {hparams['model_kwargs']}"
        detail = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)):
            if keys:
                detail.append(f"{len(keys)} weights {what} (e.g. {keys[0]})")
        raise CheckpointError(f"checkpoint {ckpt_path} holds {holds}, but the config asks for {model_name}"
                              + (f" ({', '.join(detail)})" if detail else "")
                              + ": use the run's own config.yaml, or --model.model " + str(held or "..."))
    if not resume or optimizer_class is None:
        return
    saved = (ckpt.get("lightcnn") or {}).get("optimizers")
    cls = _import(optimizer_class)
    if saved and cls is not None and saved[0] != _class_path(cls):
        raise CheckpointError(f"checkpoint {ckpt_path} was trained with {saved[0]}, but the config asks for "
                              f"{optimizer_class}: resuming needs the same optimizer (start a new run from its "
                              "weights with --model.init_weights to change it)")
    if not saved and ckpt.get("optimizer_states"):  # a checkpoint from before the optimiser was recorded
        keys = set(ckpt["optimizer_states"][0]["param_groups"][0]) - {"params", "initial_lr"}
        wanted = set(_optimizer_defaults(optimizer_class)) - {"params", "initial_lr"}
        if wanted and keys != wanted:
            raise CheckpointError(f"checkpoint {ckpt_path} holds the state of an optimizer with settings "
                                  f"{sorted(keys)}, but {optimizer_class} has {sorted(wanted)}: resuming needs the "
                                  "same optimizer")


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _optimizer_defaults(class_path: str) -> dict:
    try:
        return dict(_import(class_path)([torch.zeros(1, requires_grad=True)]).param_groups[0])
    except Exception:  # an optimiser that needs other arguments: nothing to compare with
        return {}


def slurm_job_id() -> str | None:
    """The id SLURM requeues (an array task's `JOBID_TASK`), when this process runs a SLURM batch job that
    Lightning treats as such (`SLURMEnvironment.detect()`: not an interactive shell)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


SLURM_MARKER = ".slurm_job_id"


def slurm_requeued_run(run_root: str, name: str) -> Path | None:
    """The run folder this SLURM job wrote before it was requeued (SLURM_RESTART_COUNT > 0), if any."""
    job = slurm_job_id()
    if job is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0:
        return None
    runs = [m.parent for m in (Path(run_root) / name).glob(f"*/{SLURM_MARKER}") if m.read_text().strip() == job]
    return _newest(runs) if runs else None


def resume_point(run: Path) -> str | None:
    """The newest state of a requeued run: Lightning's SLURM checkpoint, else its last.ckpt."""
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if hpc:
        return str(hpc[-1])
    last = run / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def other_ranks(trainer: L.Trainer | None) -> list:
    """The processes of the other ranks when Lightning launched them from this one (`Popen` objects)."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return list(launcher.procs) if isinstance(launcher, _SubprocessScriptLauncher) else []


def end_other_ranks(trainer: L.Trainer | None, wait: float = 5.0) -> None:
    """After this rank failed or stopped: give the ranks it launched `wait` seconds, then kill them (a stopped
    or blocked rank would otherwise stay behind, holding its GPU)."""
    procs = [p for p in other_ranks(trainer) if p.poll() is None]
    deadline = time.monotonic() + wait
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


class SigtermWatchdog:
    """Ends the process `grace` seconds after a SIGTERM that Python could not act on.

    Lightning handles SIGTERM at the next batch boundary; a rank blocked in a collective (waiting for a
    stopped or dead peer, up to the process group's timeout) never gets there. The C-level signal handler
    still writes the signal number to `signal.set_wakeup_fd`; a thread reading it kills the ranks this
    process launched and exits with 143 once the grace period is over. `LIGHTCNN_SIGTERM_GRACE` sets it
    (seconds, default 30: SLURM's usual wait between SIGTERM and SIGKILL).
    """

    def __init__(self, trainer_of, grace: float | None = None):
        self.grace = float(os.environ.get("LIGHTCNN_SIGTERM_GRACE", "30")) if grace is None else grace
        self.trainer_of, self.done = trainer_of, threading.Event()
        self._read = self._write = None
        self._old_fd = -1

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="lightcnn-sigterm-watchdog", daemon=True).start()
        return self

    def _watch(self) -> None:
        try:
            self._wait_for_sigterm()
        finally:
            os.close(self._read)

    def _wait_for_sigterm(self) -> None:
        while not self.done.is_set():
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data or self.done.is_set():
                return
            if signal.SIGTERM in data and not self.done.wait(self.grace):
                print(f"lightcnn: SIGTERM not handled within {self.grace:g} s (a process is blocked, e.g. in a DDP "
                      "collective waiting for a stopped rank): exiting", file=sys.stderr, flush=True)
                for p in other_ranks(self.trainer_of()):
                    p.kill()
                os._exit(EXIT_SIGTERM)

    def __exit__(self, *exc) -> None:
        self.done.set()
        if self._write is not None:
            signal.set_wakeup_fd(self._old_fd)
            os.close(self._write)  # ends the thread's read
            self._write = None
