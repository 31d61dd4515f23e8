"""Training tricks of the papers that act on the network during training, as Lightning callbacks:
`RenormalizeFilters` (ZFNet) and `ScheduledDropPath` (NASNet).

Use one from an experiment file:

    trainer:
      callbacks:
        - class_path: lightcnn.training.RenormalizeFilters
          init_args: {radius: 0.1}
        - class_path: lightcnn.training.ScheduledDropPath
          init_args: {interval: step}
"""
from __future__ import annotations

from typing import Literal

import lightning as L
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightcnn.models.zfnet import renormalize_filters_


class RenormalizeFilters(L.Callback):
    """ZFNet's trick (Zeiler & Fergus 2014, Sec. 3.1): after every optimiser step, each convolution filter
    whose RMS exceeds `radius` is scaled back to RMS `radius` (`lightcnn.models.zfnet.renormalize_filters_`).

    It runs as a post-step hook of the optimiser, so exactly once per real update: not on the batches of
    gradient accumulation that do not step, nor on a step that AMP's gradient scaler skips.

    Args:
        radius: the RMS bound of a filter (the paper's 10^-1).
    """

    def __init__(self, radius: float = 0.1):
        if radius <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        self.radius = radius
        self.rescaled = 0  # filters rescaled so far (all steps together), for logs and tests
        self._handles: list[RemovableHandle] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def renormalize(optimizer, args, kwargs) -> None:
            self.rescaled += renormalize_filters_(pl_module, self.radius)

        self._handles = [opt.register_step_post_hook(renormalize) for opt in trainer.optimizers]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)


class ScheduledDropPath(L.Callback):
    """NASNet's ScheduledDropPath (Zoph et al. 2018, Sec. 4.1): the drop probability of each path rises
    linearly from 0 at the start of training to its final value at the end (the released code: keep
    probability 1 - min(1, step / total_training_steps) * (1 - drop_path_keep_prob), further scaled by cell
    depth inside the model). Before every training batch this hands the fraction of training done to the
    network's `set_drop_path_progress(fraction)`; the network decides what it means for each of its paths.

    Args:
        interval: "step": fraction = optimiser steps done / `total_steps` (the released code's
            global_step / total_training_steps); "epoch": fraction = epochs done / `trainer.max_epochs`,
            constant within an epoch.
        total_steps: the steps over which the probability rises (released CIFAR: 937,500 = 600 epochs of
            batch 32). None: the whole run, `trainer.estimated_stepping_batches`. Past it the fraction stays 1.
        log: log the fraction as `drop_path/progress`.
    """

    def __init__(self, interval: Literal["step", "epoch"] = "step", total_steps: int | None = None, log: bool = True):
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        self.interval, self.total_steps, self.log = interval, total_steps, log
        self.fraction = 0.0

    @staticmethod
    def network(pl_module: L.LightningModule) -> nn.Module:
        """The module that schedules drop-path: the LightningModule's `net`, or the LightningModule itself."""
        for candidate in (getattr(pl_module, "net", None), pl_module):
            fn = getattr(candidate, "set_drop_path_progress", None)
            if callable(fn):
                return candidate
        net = getattr(pl_module, "net", pl_module)
        raise TypeError(f"ScheduledDropPath needs a network with set_drop_path_progress(fraction), but "
                        f"{type(net).__name__} has none; remove the callback or train a model that schedules "
                        f"drop-path (e.g. nasnet_a_cifar)")

    def _fraction(self, trainer: L.Trainer) -> float:
        if self.interval == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 1:
                raise ValueError("ScheduledDropPath(interval='epoch') needs trainer.max_epochs; set it, or use "
                                 "interval='step'")
            return trainer.current_epoch / trainer.max_epochs
        total = self.total_steps or trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("ScheduledDropPath cannot tell the length of an unbounded run: set total_steps, or "
                             "trainer.max_steps / max_epochs")
        return trainer.global_step / max(int(total), 1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.network(pl_module)  # fail at the start, not after the first epoch, if there is nothing to drive

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.fraction = min(self._fraction(trainer), 1.0)
        self.network(pl_module).set_drop_path_progress(self.fraction)
        if self.log:
            pl_module.log("drop_path/progress", self.fraction, on_step=True, on_epoch=False)
