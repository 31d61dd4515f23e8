"""W&B for lightcnn runs: offline without credentials, always finished, and quiet on a first run.

- `default_wandb_mode()`: logs offline unless the user chose a `WANDB_MODE` or has credentials
  (`WANDB_API_KEY` or a netrc entry from `wandb login`), so a run never waits for a login prompt; with
  credentials but no reachable server it logs offline too, instead of stalling and failing.
- `wandb_run_id_file(run_dir)`: where a run folder keeps its W&B run id, so that a resumed or requeued
  run logs to the same W&B run.
- `finish_wandb()`: closes the run (also after an error, so no process hangs at exit) and says how to
  upload an offline run.
- `WandbLogger`: Lightning's logger, minus the two warnings it makes W&B print on every first run.
"""
from __future__ import annotations

import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch import loggers
from lightning.pytorch.utilities import rank_zero_info


def have_wandb_credentials() -> bool:
    """True when W&B could log in without a prompt: `WANDB_API_KEY`, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_server_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server (`WANDB_BASE_URL`) opens within `timeout` seconds."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable, unknown host, timed out
        return False


def default_wandb_mode() -> None:
    """Offline unless the user chose a mode or has credentials and the server answers: a run must never wait
    for a login prompt, nor stall on a server it cannot reach."""
    if "WANDB_MODE" in os.environ:
        return
    if not have_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
        rank_zero_info("lightcnn: no W&B credentials (WANDB_API_KEY or `wandb login`): W&B logs offline")
    elif not wandb_server_reachable():
        os.environ["WANDB_MODE"] = "offline"
        server = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        rank_zero_info(f"lightcnn: the W&B server {server} cannot be reached: W&B logs offline "
                       "(upload the run later with `wandb sync`)")


def wandb_run_id_file(run_dir: str | os.PathLike) -> Path:
    """The file in a run folder that holds its W&B run id."""
    return Path(run_dir) / "wandb_run_id"


def finish_wandb() -> None:
    """Close the W&B run (if any) so no process hangs at exit, and say how to upload an offline run."""
    if "wandb" not in sys.modules:
        return
    import wandb

    run = wandb.run
    offline = run is not None and run.settings.mode == "offline"
    run_dir = str(Path(run.dir).parent) if offline else None
    if run is not None:
        wandb.finish()
    # Stop W&B's service process too: it flushes the run files and forgets this process's settings, so
    # that a later run in the same process reads WANDB_MODE afresh.
    wandb.teardown()
    if offline:
        print(f"lightcnn: W&B run saved offline in {run_dir}\n  upload it with:  wandb sync {run_dir}")


class WandbLogger(loggers.WandbLogger):
    """Lightning's `WandbLogger` (same arguments), without the two warnings of a first run:

    - "The anonymous setting has no effect": Lightning always hands `anonymous=None` to `wandb.init`,
      and W&B (>= 0.19) warns about the deprecated setting whatever its value; it is dropped unless set.
    - "git root runs does not exist": W&B looks for the git repository above `save_dir` when the run
      starts, which Lightning does before anything has created that folder; it is created here.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # no public way to leave it out of wandb.init's kwargs
            self._wandb_init.pop("anonymous", None)
        if self.save_dir:
            os.makedirs(self.save_dir, exist_ok=True)
