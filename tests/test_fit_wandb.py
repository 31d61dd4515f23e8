"""W&B through Lightning's WandbLogger: offline without credentials, off with WANDB_MODE=disabled,
and the metrics of a short fit read back from the offline run's own files."""
import json
import math
import os
import struct
import time
from pathlib import Path

import pytest

from lightcnn.training import WandbLogger
from lightcnn.training.cli import main
from lightcnn.training.wandb_utils import default_wandb_mode

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "lenet5_digits.yaml")
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2",
         "--trainer.limit_test_batches", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.log_every_n_steps", "1"]


def read_wandb_records(run_file: Path) -> list:
    """The protobuf `Record`s of an offline `run-*.wandb` file: W&B's record log (LevelDB log format: a
    7-byte file header, 32 KiB blocks of chunks, each chunk `crc32 | length u16 | type u8`)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, records, pending = run_file.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def read_wandb_history(run_file: Path, timeout: float = 60.0) -> list[dict]:
    """The logged rows of a finished offline run. W&B's service process writes the file on its own
    schedule, so wait until the run's final `exit` record is in it."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])


def test_offline_run_logs_the_metrics_to_its_run_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # W&B's own warnings must be silent by their cause
    cli = main([DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
                str(tmp_path / "wb"), *SHORT])
    # W&B's files are in the run folder (RUN_ROOT/NAME/TIMESTAMP/wandb), whatever the logger's save_dir says.
    assert not list((tmp_path / "wb").rglob("*.wandb"))
    (run_file,) = (tmp_path / "runs").glob("lenet5_digits/*/wandb/offline-run-*/run-*.wandb")
    rows = read_wandb_history(run_file)
    metrics = cli.trainer.callback_metrics
    val = [r for r in rows if "val/acc1" in r]
    assert len(val) == 2 and all({"val/loss", "val/acc5"} <= r.keys() for r in val)  # one row per epoch
    (test,) = [r for r in rows if "test/acc1" in r]
    for key in ("test/acc1", "test/acc5", "test/loss"):
        assert test[key] == pytest.approx(metrics[key].item(), rel=1e-6)
    # Every step's LR: the recipe's cosine schedule (lr 0.05, T_max 30) stepped once per epoch.
    lrs = [r["lr"] for r in rows if "lr" in r]
    expected = [0.05] * 5 + [0.05 * (1 + math.cos(math.pi / 30)) / 2] * 5
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert any("train/loss_step" in r for r in rows)
    out, err = capsys.readouterr()
    assert f"wandb sync {run_file.parent}" in out  # says how to upload the offline run
    for warning in ("anonymous setting has no effect", "git root", "WARNING"):  # a first run is quiet
        assert warning not in out + err, (out + err)[-3000:]
    import wandb

    assert wandb.run is None  # finished: nothing left to hang at exit


def test_wandb_mode_disabled_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cli = main([DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
                str(tmp_path / "wb"), "--test_after_fit", "false", *SHORT])
    assert cli.trainer.global_step == 10
    assert not list(tmp_path.rglob("*.wandb"))


def test_wandb_is_finished_when_training_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("lightcnn.training.module.ClassifierModule.training_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        main([DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
              str(tmp_path / "wb"), *SHORT])
    import wandb

    assert wandb.run is None


def test_wandb_logger_leaves_out_anonymous_and_makes_its_folder(tmp_path):
    save_dir = tmp_path / "not" / "yet"
    logger = WandbLogger(project="p", save_dir=str(save_dir))
    assert save_dir.is_dir()  # W&B looks for a git repository above it when the run starts
    assert "anonymous" not in logger._wandb_init  # any value makes W&B warn that the setting is dead
    assert WandbLogger(project="p", anonymous=True)._wandb_init["anonymous"] == "allow"  # a chosen one stays


def test_without_credentials_wandb_goes_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    default_wandb_mode()
    assert os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("how", ["api_key", "netrc", "mode"])
def test_credentials_or_a_chosen_mode_are_respected(how, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    # A reachable server (tests never talk to a network; an unreachable one: tests/test_reliability.py).
    monkeypatch.setattr("lightcnn.training.wandb_utils.wandb_server_reachable", lambda timeout=3.0: True)
    if how == "api_key":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    elif how == "netrc":
        (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
        monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    else:
        monkeypatch.setenv("WANDB_MODE", "online")
    default_wandb_mode()
    assert os.environ.get("WANDB_MODE") == ("online" if how == "mode" else None)
