"""Checkpoint files that are always whole and checked before use.

`AtomicCheckpointIO` is the checkpoint plugin of every lightcnn run (the CLI adds it to the trainer):

- a save writes a temporary file in the target's own folder, flushes and fsyncs it, renames it over the
  target and fsyncs the folder. A kill or a full disk at any moment leaves the old file or the new one,
  never a truncated one (Lightning's own save copies from $TMPDIR over the target, which on another
  filesystem truncates it first);
- the file stays a plain `torch.save` zip (`torch.load` reads it) and carries the SHA-256 of its payload
  in the zip's comment field, so junk bytes or a truncation are caught before a resume, a test or a load;
- a damaged file is a `CheckpointError` whose one line names the intact checkpoints beside it.

`load_checkpoint(path)` verifies and loads a checkpoint for any tool (visualize, predict, export).
"""
from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

# The zip "end of central directory" record: 22 bytes ending with the comment's length (uint16).
_EOCD_SIGNATURE = b"PK\x05\x06"
_EOCD_SIZE = 22
_TAG = b"lightcnn-sha256:"
_COMMENT_SIZE = len(_TAG) + 64
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (empty, truncated, altered, not a checkpoint)."""


class NonFiniteLossError(RuntimeError):
    """The training loss, or the weights about to be saved, stopped being finite."""


def is_finite_state(state: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading: the rename is done, only its flush is skipped
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _HashingWriter:
    """A write-only file object that hashes what passes through it (torch.save writes sequentially)."""

    def __init__(self, file):
        self.file, self.sha = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint_file(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically, with the payload's SHA-256 in the zip comment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            end = f.tell()
            f.seek(end - 2)  # the EOCD's comment length, 0 as torch wrote it
            f.write(struct.pack("<H", _COMMENT_SIZE) + _TAG + writer.sha.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _problem(path: Path) -> str | None:
    """What is wrong with the checkpoint file (None: whole, or an unsigned file that looks whole)."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        tail_size = min(size, _EOCD_SIZE + _COMMENT_SIZE)
        f.seek(size - tail_size)
        tail = f.read(tail_size)
        signed = size >= _EOCD_SIZE + _COMMENT_SIZE and tail[-_COMMENT_SIZE:].startswith(_TAG)
        if not signed:
            # Not written by lightcnn (Lightning's own, or older): check what the zip format allows.
            if _EOCD_SIGNATURE not in tail and _EOCD_SIGNATURE not in _tail(f, size, 65536 + _EOCD_SIZE):
                return "is truncated or not a checkpoint (no zip directory at its end)"
            return None
        eocd = tail[:_EOCD_SIZE]
        if eocd[:4] != _EOCD_SIGNATURE or struct.unpack("<H", eocd[-2:])[0] != _COMMENT_SIZE:
            return "is damaged (its zip directory is not where its checksum says)"
        expected = tail[-64:].decode("ascii", "replace")
        sha, left = hashlib.sha256(), size - _COMMENT_SIZE - 2
        f.seek(0)
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
        sha.update(b"\x00\x00")
        if sha.hexdigest() != expected:
            return "is damaged (its SHA-256 does not match the one stored in it)"
    return None


def _tail(f, size: int, n: int) -> bytes:
    f.seek(max(0, size - n))
    return f.read(n)


def intact_checkpoints_beside(path: str | os.PathLike) -> list[Path]:
    """The other `*.ckpt` files in the folder of `path` that pass the check, newest first."""
    path = Path(path)
    others = [p for p in path.parent.glob("*.ckpt") if p != path and p.is_file()]
    good = [p for p in others if _safe_problem(p) is None]
    return sorted(good, key=lambda p: p.stat().st_mtime, reverse=True)


def _safe_problem(path: Path) -> str | None:
    try:
        return _problem(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` (one line, naming the intact checkpoints beside it) unless `path` is whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    problem = _safe_problem(path)
    if problem is not None:
        raise CheckpointError(_damaged_message(path, problem))


def _damaged_message(path: Path, problem: str) -> str:
    good = intact_checkpoints_beside(path)
    hint = ("intact checkpoints beside it: " + ", ".join(str(p) for p in good) + "; pass one with --ckpt_path"
            if good else "no intact checkpoint beside it")
    return f"checkpoint {path} {problem}; {hint}"


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool = False) -> dict:
    """Verify a checkpoint file, then `torch.load` it; a damaged file raises `CheckpointError`."""
    verify_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (EOFError, RuntimeError, OSError, ValueError) as e:  # an unsigned file that the zip check let pass
        raise CheckpointError(_damaged_message(Path(path), f"cannot be read ({type(e).__name__}: {e})")) from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic, checksummed saves and verified loads (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        if not is_finite_state(checkpoint.get("state_dict", {})):  # never replace a good file by diverged weights
            raise NonFiniteLossError(f"the weights are not finite (the run diverged): {path} was not written")
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location,
                               weights_only=False if weights_only is None else weights_only)

    def remove_checkpoint(self, path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
