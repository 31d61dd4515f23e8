"""The reliability contract (docs/reliability.md) through the CLI: whole checkpoints, honest exit codes,
`--ckpt_path last`, one-line errors. Faults are injected (tests/helpers.py); no disk is filled."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightcnn.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint_file
from lightcnn.training.cli import SaveRunConfig, main
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "experiments" / "lenet5_digits.yaml")
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
# 3 steps per epoch, one validation batch.
SHORT = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
         *QUIET]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightcnn.fit"])


def _run_dir(cli) -> Path:
    return Path(next(cb for cb in cli.trainer.callbacks if isinstance(cb, SaveRunConfig)).run_dir)


def _fit(tmp_path, *args, epochs=1):
    return main([DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", str(epochs), *SHORT, *args])


def _exit(capsys, *args, stage="fit") -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args), stage=stage)
    return e.value.code, capsys.readouterr().err


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled"}


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


# --- whole checkpoints -----------------------------------------------------------------------------------

def test_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint_whole(tmp_path):
    # The cluster layout: $TMPDIR on another filesystem (tmpfs) than the run folder.
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    scratch = Path(f"/dev/shm/lightcnn-test-{os.getpid()}")
    scratch.mkdir(exist_ok=True)
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "tests.helpers", "kill", str(runs), "--",
           DIGITS, "--run_root", str(runs), "--trainer.max_epochs", "2", *SHORT]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**_env(), "TMPDIR": str(scratch)}, capture_output=True, text=True,
                          timeout=240)
    shutil.rmtree(scratch)  # (W&B makes its temporary folders there on import)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]  # killed during the second save
    (last,) = runs.glob("*/*/checkpoints/last.ckpt")
    ckpt = load_checkpoint(last)  # verified: whole, checksum matches
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0  # the first epoch's checkpoint, untouched


def test_full_disk_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    monkeypatch.setattr("tempfile.tempdir", str(scratch))  # $TMPDIR elsewhere, as on a cluster
    runs = tmp_path / "runs"
    for name in ("os.sendfile", "os.fsync", "shutil.copyfileobj"):  # restored after the test
        monkeypatch.setattr(name, eval(name))
    helpers.inject(helpers.no_space, helpers.second_save(str(runs)))
    code, err = _exit(capsys, DIGITS, "--run_root", str(runs), "--trainer.max_epochs", "2", *SHORT)
    assert code == 2 and "lightcnn.fit: error:" in err and "No space left on device" in err, err
    assert "Traceback" not in err
    ckpts = sorted(p.name for p in runs.glob("*/*/checkpoints/*"))
    assert ckpts == ["epoch=0-step=3.ckpt", "last.ckpt"]  # no temporary file left behind either
    (last,) = runs.glob("*/*/checkpoints/last.ckpt")
    assert load_checkpoint(last)["global_step"] == 3


def test_checkpoint_file_is_a_plain_torch_file_with_its_checksum(tmp_path):
    path = tmp_path / "a.ckpt"
    save_checkpoint_file({"state_dict": {"w": torch.arange(4.0)}}, path)
    assert torch.equal(torch.load(path, weights_only=False)["state_dict"]["w"], torch.arange(4.0))
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.arange(4.0))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(path)


def _two_epochs(tmp_path) -> Path:
    cli = _fit(tmp_path, "--test_after_fit", "false", epochs=2)
    return _run_dir(cli) / "checkpoints"


def test_junk_bytes_in_a_checkpoint_stop_the_resume_naming_the_intact_one(tmp_path, capsys):
    ckpts = _two_epochs(tmp_path)
    last = ckpts / "last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2:len(data) // 2 + 12] = b"\x7f" * 12  # twelve junk bytes inside a weight
    last.write_bytes(bytes(data))
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", "3",
                      "--ckpt_path", str(last), *SHORT)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert "SHA-256 does not match" in line and str(ckpts / "epoch=1-step=6.ckpt") in line, line


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_empty_or_truncated_checkpoint_is_one_line_naming_the_intact_ones(damage, tmp_path, capsys):
    ckpts = _two_epochs(tmp_path)
    last = ckpts / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
    run = ckpts.parent
    for stage, args in (("fit", [DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", "3"]),
                        ("test", [str(run / "config.yaml")])):
        code, err = _exit(capsys, *args, "--ckpt_path", str(last), *SHORT, stage=stage)
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"lightcnn.{stage}: error: checkpoint {last} is ")
        assert ("empty" if damage == "empty" else "truncated") in line and "epoch=1-step=6.ckpt" in line, line


# --- divergence ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step, says", [
    (4, "the training loss is nan at epoch 1, step 5"),  # mid-epoch: the next loss is NaN
    (6, "the weights are not finite at epoch 1, step 6"),  # the epoch's last step: finite loss, NaN weights saved
])
def test_diverged_run_stops_with_exit_1_and_keeps_the_good_checkpoint(step, says, tmp_path, capsys):
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", "3", *SHORT,
                      "--trainer.callbacks+=tests.helpers.BlowUpAfterStep", f"--trainer.callbacks.step={step}")
    assert code == 1, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"lightcnn.fit: error: {says}"), line
    ckpts = sorted((tmp_path / "runs").glob("*/*/checkpoints/*.ckpt"))
    assert sorted(p.name for p in ckpts) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    for p in ckpts:
        weights = load_checkpoint(p)["state_dict"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()), p


# --- signals and exit codes ------------------------------------------------------------------------------

def test_sigterm_saves_a_resumable_checkpoint_exits_143_and_resumes(tmp_path, capsys):
    runs = str(tmp_path / "runs")
    code, err = _exit(capsys, DIGITS, "--run_root", runs, "--trainer.max_epochs", "2", *SHORT,
                      "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=4")
    assert code == 143, err
    assert "stopped by SIGTERM" in err and "last.ckpt" in err, err
    (last,) = Path(runs).glob("*/*/checkpoints/last.ckpt")
    assert load_checkpoint(last)["global_step"] == 4  # the partial epoch is saved
    resumed = main([DIGITS, "--run_root", runs, "--trainer.max_epochs", "2", "--ckpt_path", "last", *SHORT])
    assert resumed.trainer.global_step == 6 and _run_dir(resumed) == last.parent.parent
    assert "test/acc1" in resumed.trainer.callback_metrics


def test_sigint_exits_130(tmp_path, capsys):
    handler = signal.getsignal(signal.SIGINT)
    # Python's Ctrl-C handler, as in a terminal: a shell starts a job run with `&` with SIGINT ignored, and
    # Python then leaves it so (pytest started that way would otherwise never see the signal).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", "2", *SHORT,
                          "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=2",
                          f"--trainer.callbacks.signum={int(signal.SIGINT)}")
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert code == 130 and "stopped by Ctrl-C" in err, err


# --- --ckpt_path last ------------------------------------------------------------------------------------

def test_test_with_ckpt_path_last_evaluates_the_runs_last_checkpoint(tmp_path, capsys):
    fit = _fit(tmp_path)
    run = _run_dir(fit)
    test = main([str(run / "config.yaml"), "--ckpt_path", "last", *SHORT], stage="test")
    assert test.trainer.ckpt_path == str(run / "checkpoints" / "last.ckpt")
    assert test.trainer.callback_metrics["test/acc1"].item() == fit.trainer.callback_metrics["test/acc1"].item()
    code, err = _exit(capsys, DIGITS, "--ckpt_path", "last", *SHORT, stage="test")  # not a run folder
    assert code == 2 and "--ckpt_path last" in err and "run folder" in err, err


def test_fit_with_ckpt_path_last_resumes_the_newest_run_or_says_there_is_none(tmp_path, capsys):
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--ckpt_path", "last", *SHORT)
    assert code == 2 and "no run of 'lenet5_digits'" in err, err
    assert not (tmp_path / "runs").exists()  # nothing made
    _fit(tmp_path, "--test_after_fit", "false")
    time.sleep(1.1)  # run folders are named by the second
    newest = _run_dir(_fit(tmp_path, "--test_after_fit", "false"))
    resumed = _fit(tmp_path, "--test_after_fit", "false", "--ckpt_path", "last", epochs=2)
    assert _run_dir(resumed) == newest and resumed.trainer.global_step == 6
    assert len(list((tmp_path / "runs" / "lenet5_digits").iterdir())) == 2  # no new run folder


def test_limit_train_batches_1_means_one_batch(tmp_path):
    cli = _fit(tmp_path, "--test_after_fit", "false", "--trainer.limit_train_batches", "1")
    assert cli.trainer.limit_train_batches == 1 and cli.trainer.global_step == 1
    cli = _fit(tmp_path, "--test_after_fit", "false", "--trainer.limit_train_batches", "1.0",
               "--trainer.limit_val_batches", "1")
    whole = len(cli.datamodule.train_dataloader())
    assert whole > 1 and cli.trainer.global_step == whole  # 1.0: the whole epoch


# --- resume with another model or optimiser --------------------------------------------------------------

@pytest.mark.parametrize("change, says", [
    (["--model.model", "wrn10_1"], "holds a lenet5, but the config asks for wrn10_1"),
    (["--model.optimizer", "torch.optim.Adam", "--model.optimizer.init_args.lr", "0.001"],
     "was trained with torch.optim.sgd.SGD, but the config asks for torch.optim.Adam"),
])
def test_resume_with_another_model_or_optimizer_is_one_line(change, says, tmp_path, capsys):
    last = _run_dir(_fit(tmp_path, "--test_after_fit", "false")) / "checkpoints" / "last.ckpt"
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", "2",
                      "--ckpt_path", str(last), *change, *SHORT)
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert says in line, line
    assert not list(last.parent.parent.glob("config-resumed-*.yaml"))  # a failed resume leaves no trace


# --- one-line errors -------------------------------------------------------------------------------------

def test_errors_raised_inside_fit_are_one_line_with_exit_2(tmp_path, capsys):
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--model.optimizer.init_args.lr", "-0.1",
                      *SHORT)
    assert code == 2 and err.strip() == "lightcnn.fit: error: Invalid learning rate: -0.1", err
    assert not (tmp_path / "runs" / "lenet5_digits").exists() or not any((tmp_path / "runs" / "lenet5_digits")
                                                                       .iterdir())  # no empty run folder
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _exit(capsys, DIGITS, "--run_root", str(blocker / "runs"), *SHORT)
    assert code == 2 and "--run_root" in err and "is a file, not a folder" in err and "Traceback" not in err, err


def test_unwritable_wandb_save_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.logger.init_args.save_dir",
                      str(blocker / "wandb"), "--trainer.enable_progress_bar", "false")
    assert code == 2 and "W&B logger's save_dir" in err and "Union" not in err, err


def test_unreachable_wandb_server_logs_offline_at_once(monkeypatch):
    import socket

    from lightcnn.training.wandb_utils import default_wandb_mode

    with socket.socket() as s:  # a local port with nobody listening: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    default_wandb_mode()
    assert os.environ["WANDB_MODE"] == "offline" and time.monotonic() - start < 5


@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("model:\n  model: lenet5\n  optimizer: {class_path: torch.optim.SGD\n", "is not valid YAML (line 4"),
])
def test_empty_or_malformed_experiment_file_is_named(text, says, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, err = _exit(capsys, str(bad))
    assert code == 2 and f"lightcnn.fit: error: the experiment file {bad} {says}" in err, err


def test_impl_kernel_without_a_compiled_kernel_is_an_error(monkeypatch):
    from lightcnn.layers import LocalResponseNorm
    from lightcnn.ops import lrn
    from lightcnn.ops._library import KernelUnavailableError

    monkeypatch.setitem(lrn.OP.compiled, "cpu", False)  # as if lightcnn._C were missing
    x = torch.randn(1, 8, 2, 2)
    with pytest.raises(KernelUnavailableError, match='impl="kernel": .* no CPU kernel for lrn'):
        LocalResponseNorm(3, impl="kernel")(x)
    torch.testing.assert_close(LocalResponseNorm(3, impl="reference")(x), torch.nn.functional.local_response_norm(x, 3))


def test_failed_start_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    def boom(self, stage):
        raise ValueError("the data cannot be set up")

    monkeypatch.setattr("lightcnn.data.DigitsDataModule.setup", boom)
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), *SHORT)
    assert code == 2 and "the data cannot be set up" in err, err
    assert not (tmp_path / "runs").exists()


def test_failed_resume_writes_no_resumed_config(tmp_path, monkeypatch, capsys):
    run = _run_dir(_fit(tmp_path, "--test_after_fit", "false"))

    def boom(self, stage):
        raise ValueError("the data cannot be set up")

    monkeypatch.setattr("lightcnn.data.DigitsDataModule.setup", boom)
    code, err = _exit(capsys, DIGITS, "--run_root", str(tmp_path / "runs"), "--trainer.max_epochs", "2",
                      "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *SHORT)
    assert code == 2, err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


# --- SLURM requeue ---------------------------------------------------------------------------------------

def test_slurm_requeue_resumes_in_the_same_run_folder_and_wandb_run(tmp_path, monkeypatch, capsys):
    # A stand-in `scontrol`: records the requeue, then ends the job the way SLURM does (SIGTERM).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/requeued\nkill -TERM $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "lenet", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs, wb = str(tmp_path / "runs"), tmp_path / "wb"
    args = [DIGITS, "--run_root", runs, "--trainer.max_epochs", "2", *SHORT[:-6], "--trainer.enable_progress_bar",
            "false", "--trainer.logger.init_args.save_dir", str(wb)]
    code, err = _exit(capsys, *args, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                      "--trainer.callbacks.step=4", f"--trainer.callbacks.signum={int(signal.SIGUSR1)}")
    assert code == 143, err
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    (run,) = Path(runs, "lenet5_digits").iterdir()
    assert [p.name for p in run.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]  # Lightning's, in the run folder
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # SLURM starts the same command again
    cli = main(args)
    assert _run_dir(cli) == run and len(list(Path(runs, "lenet5_digits").iterdir())) == 1
    assert cli.trainer.global_step == 6 and "test/acc1" in cli.trainer.callback_metrics
    assert len(list(run.glob("config-resumed-*.yaml"))) == 1 and not list(run.glob("hpc_ckpt_*.ckpt"))
    # Both attempts log to the same W&B run, whose files are in the run folder (RUN/wandb).
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 2 and ids == {(run / "wandb_run_id").read_text().strip()}


# --- DDP: no rank left behind ----------------------------------------------------------------------------

def _ddp_cmd(tmp_path, *extra) -> list[str]:
    return [sys.executable, "-m", "lightcnn.fit", DIGITS, "--run_root", str(tmp_path / "runs"),
            "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.max_epochs", "50", "--trainer.limit_val_batches", "1", "--test_after_fit", "false", *QUIET,
            *extra]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie has ended


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "timeout"])
def test_ddp_rank_blocked_by_a_stopped_peer_ends_on_sigterm_or_the_timeout(how, tmp_path):
    pid_file = tmp_path / "stopped.pid"
    extra = ["--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=3",
             f"--trainer.callbacks.signum={int(signal.SIGSTOP)}", "--trainer.callbacks.rank=1",
             f"--trainer.callbacks.pid_file={pid_file}"]
    if how == "timeout":  # what a recipe sets: strategy: {class_path: ...DDPStrategy, init_args: {timeout: "0:01:30"}}
        # (the rendezvous at start-up waits as long, so a loaded machine needs a minute to start the other rank)
        extra = ["--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                 "--trainer.strategy.init_args.timeout", "0:01:30", *extra]
    cmd = _ddp_cmd(tmp_path, *extra)
    if how == "timeout":
        i = cmd.index("--trainer.strategy")
        del cmd[i:i + 2]  # the plain "ddp" of _ddp_cmd
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**_env(), "LIGHTCNN_SIGTERM_GRACE": "3"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), proc.communicate(timeout=30)[1][-3000:]
        stopped = int(pid_file.read_text())
        start = time.monotonic()
        if how == "sigterm":
            time.sleep(2)  # rank 0 is now waiting in the next all-reduce
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == "sigterm":
        assert proc.returncode == 143 and took < 30, (proc.returncode, took, err[-3000:])
    else:
        assert proc.returncode != 0 and 80 < took < 240, (proc.returncode, took, err[-3000:])
    time.sleep(0.5)
    assert _gone(stopped), "the stopped rank was left behind"


@pytest.mark.slow
def test_ddp_user_error_inside_fit_is_one_line_from_rank_0(tmp_path):
    proc = subprocess.run(_ddp_cmd(tmp_path, "--data.init_args.batch_size", "33", "--trainer.max_epochs", "1"),
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("lightcnn.fit: error: batch_size=33"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ddp_sigterm_saves_a_resumable_checkpoint_and_ends_every_rank(tmp_path):
    pid_file = tmp_path / "rank0.pid"
    proc = subprocess.run(_ddp_cmd(tmp_path, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                                   "--trainer.callbacks.step=3", f"--trainer.callbacks.pid_file={pid_file}"),
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stderr.count("stopped by SIGTERM") == 1, proc.stderr[-3000:]  # said once, by rank 0
    (last,) = (tmp_path / "runs").glob("*/*/checkpoints/last.ckpt")
    assert load_checkpoint(last)["global_step"] in (3, 4)  # the step the ranks agreed to stop at
