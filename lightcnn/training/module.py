"""`ClassifierModule`: the one LightningModule, training any registered network on any classification data.

The network is a plain `nn.Module` from the registry (`lightcnn.models.create`); the optimiser and the
LR scheduler are injected from the experiment config (LightningCLI's dependency injection), so a
paper's recipe is data, not code. One `_step` is shared by train/val/test.
"""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightcnn.models import create


class ClassifierModule(L.LightningModule):
    """Train, validate and test a registered network with cross-entropy; log loss, top-1/top-5 and LR.

    Args:
        model: registered model name (`lightcnn.models.list_models()`), e.g. "wrn28_10".
        optimizer: the optimiser, e.g. `{class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}`.
        lr_scheduler: optional LR scheduler, e.g. `torch.optim.lr_scheduler.MultiStepLR` with
            `milestones`; `ReduceLROnPlateau` watches `lr_monitor`.
        model_kwargs: keyword overrides for the model builder (e.g. `drop_rate: 0.3`, `impl: reference`).
        num_classes: classes of the classifier; linked from the datamodule by the CLI.
        in_chans: input channels; linked from the datamodule by the CLI.
        lr_interval: step the scheduler every "epoch" or every "step" (iteration-based recipes such as
            ResNet's 32k/48k/64k iterations on CIFAR).
        lr_monitor: metric that a `ReduceLROnPlateau` scheduler watches.
        warmup_steps: the first `warmup_steps` optimiser steps run at `warmup_factor` x the LR (He et al.
            2016, Sec. 4.2: 0.01 instead of 0.1 for ~400 iterations on ResNet-110). 0 turns it off.
        warmup_factor: LR multiplier during warm-up.
        label_smoothing: cross-entropy label smoothing (0 in all the classic papers).
        aux_loss_weights: weight of each auxiliary head's loss for networks that return
            `(logits, *aux_logits)` while training; one number for all heads or one per head
            (GoogLeNet, Szegedy et al. 2015, Sec. 5: 0.3).
        channels_last: run the network in channels-last memory format (faster convolutions on GPUs).
        compile: `torch.compile` the inner network (not the LightningModule); checkpoints keep plain keys.
    """

    def __init__(
        self,
        model: str,
        optimizer: OptimizerCallable,
        lr_scheduler: LRSchedulerCallable | None = None,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        lr_interval: Literal["epoch", "step"] = "epoch",
        lr_monitor: str = "val/acc1",
        warmup_steps: int = 0,
        warmup_factor: float = 0.1,
        label_smoothing: float = 0.0,
        aux_loss_weights: float | list[float] = 0.3,
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if warmup_steps < 0 or warmup_factor <= 0:
            raise ValueError(f"need warmup_steps >= 0 and warmup_factor > 0, got {warmup_steps}, {warmup_factor}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self._make_optimizer, self._make_scheduler = optimizer, lr_scheduler
        kwargs = dict(model_kwargs or {})
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        self.net: nn.Module = create(model, num_classes=num_classes, **kwargs)
        self.num_classes = num_classes if num_classes is not None else self.net.num_classes
        self.train_metrics = self._metrics("train/")
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")

    def _metrics(self, prefix: str) -> MetricCollection:
        # micro average = the fraction of correctly classified images, the papers' accuracy.
        ks = [k for k in (1, 5) if k == 1 or self.num_classes > k]
        return MetricCollection(
            {f"acc{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro") for k in ks}, prefix=prefix
        )

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.net.compile()  # in place: the state-dict keys stay those of the plain network
            self._compiled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _aux_weights(self, n: int) -> list[float]:
        w = self.hparams.aux_loss_weights
        if isinstance(w, (int, float)):
            return [float(w)] * n
        if len(w) != n:
            raise ValueError(f"the network returned {n} auxiliary outputs but aux_loss_weights has {len(w)}: {w}")
        return list(w)

    def _step(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        # Networks with auxiliary classifiers return (logits, *aux_logits) while training (a named tuple).
        logits, aux = (out[0], out[1:]) if isinstance(out, (tuple, list)) else (out, ())
        smoothing = self.hparams.label_smoothing
        loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        if aux:
            main_loss = loss
            for w, a in zip(self._aux_weights(len(aux)), aux):
                loss = loss + w * F.cross_entropy(a, y, label_smoothing=smoothing)
            self.log(f"{stage}/loss_main", main_loss, on_step=False, on_epoch=True, sync_dist=True)
        metrics.update(logits.detach(), y)
        # sync_dist: the epoch's loss is averaged over all processes (one scalar all-reduce per step).
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_metrics, "test")

    def _lr_factor(self) -> float:
        return self.hparams.warmup_factor if self.global_step < self.hparams.warmup_steps else 1.0

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The LR this step really uses (warm-up included), logged with the training curves.
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] * self._lr_factor()
        self.log("lr", lr, on_step=True, on_epoch=False, prog_bar=False)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        factor = self._lr_factor()
        if factor == 1.0:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Warm-up: scale the LR for this step only, so the scheduler's own LR is left untouched.
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    def configure_optimizers(self):
        optimizer = self._make_optimizer(self.parameters())
        if self._make_scheduler is None:
            return optimizer
        scheduler = self._make_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.lr_interval,
                             "monitor": self.hparams.lr_monitor},
        }
