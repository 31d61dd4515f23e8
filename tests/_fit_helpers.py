"""Helpers that the tests' CLI subprocesses load by class path (`tests._fit_helpers.X`)."""
from pathlib import Path

import lightning as L
import torch


class SaveRankWeights(L.Callback):
    """At the end of fit, every process saves its own copy of the parameters as `dirpath/rank{R}.pt`."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}
        torch.save({"params": params, "global_step": trainer.global_step, "world_size": trainer.world_size},
                   Path(self.dirpath) / f"rank{trainer.global_rank}.pt")
