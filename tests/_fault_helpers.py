"""Faults injected into the CLI's own process by tests/test_reliability.py (`python -c` runs these first).

Each fault strikes while the bytes of a checkpoint go to disk, wherever the saver sends them: through
`os.sendfile`/`shutil.copyfileobj` (a copy from $TMPDIR over the target, Lightning's own save across
filesystems) or before `os.fsync` (a write of a file that is then flushed).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
from pathlib import Path

import lightning as L


def inject(fault, armed) -> None:
    """Call `fault()` in the middle of the next checkpoint write once `armed()` is true."""
    real_sendfile, real_copyfileobj, real_fsync = os.sendfile, shutil.copyfileobj, os.fsync

    def sendfile(out_fd, in_fd, offset, count):
        if armed():
            real_sendfile(out_fd, in_fd, offset, max(1, count // 2048))  # part of the bytes, then the fault
            fault()
        return real_sendfile(out_fd, in_fd, offset, count)

    def copyfileobj(fsrc, fdst, length=0):
        if armed():
            fdst.write(fsrc.read(100))
            fdst.flush()
            fault()
        return real_copyfileobj(fsrc, fdst, length) if length else real_copyfileobj(fsrc, fdst)

    def fsync(fd):
        if armed():
            fault()
        return real_fsync(fd)

    os.sendfile, shutil.copyfileobj, os.fsync = sendfile, copyfileobj, fsync


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def no_space() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def second_save(run_root: str):
    """True once a `last.ckpt` exists under run_root (the first save is done)."""
    return lambda: any(Path(run_root).glob("*/*/checkpoints/last.ckpt"))


class SignalAtStep(L.Callback):
    """Send `signum` to this process after training step `step` (global) of rank `rank`."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), rank: int = 0, pid_file: str | None = None):
        self.step, self.signum, self.rank, self.pid_file = step, signum, rank, pid_file

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.pid_file:  # tells the test which process it is and that the signal is on its way
                Path(self.pid_file).write_text(str(os.getpid()))
            os.kill(os.getpid(), self.signum)


class BlowUpAfterStep(L.Callback):
    """Set every weight to NaN after training step `step`: a run diverging at a known point."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            for p in pl_module.parameters():
                p.data.fill_(float("nan"))


if __name__ == "__main__":  # python -m tests._fault_helpers FAULT RUN_ROOT -- fit arguments
    fault, run_root = sys.argv[1], sys.argv[2]
    inject({"kill": kill, "no_space": no_space}[fault], second_save(run_root))
    from lightcnn.training.cli import main

    main(sys.argv[4:], stage="fit")
