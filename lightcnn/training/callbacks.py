"""Training tricks of the papers that act on the weights between optimiser steps, as Lightning callbacks.

Use one from an experiment file:

    trainer:
      callbacks:
        - class_path: lightcnn.training.callbacks.RenormalizeFilters
          init_args: {radius: 0.1}
"""
from __future__ import annotations

import lightning as L
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
