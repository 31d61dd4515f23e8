"""`ClassifierModule`: the one LightningModule, training any registered network on any classification data.

The network is a plain `nn.Module` from the registry (`lightcnn.models.create`); the optimiser and the
LR scheduler are injected from the experiment config (LightningCLI's dependency injection), so a
paper's recipe is data, not code. One `_step` is shared by train/val/test.

Research knobs, all off by default so that the paper recipes train as published: starting weights
(`init_weights`), MixUp/CutMix (`mixup_alpha`, `cutmix_alpha`: torchvision.transforms.v2 on whole batches,
soft-target cross-entropy, accuracy against the hard labels), a linear warm-up into any schedule
(`warmup: linear`), and no weight decay on normalisation weights and biases (`weight_decay_norm_bias: false`).
A subclass (`--model pkg.module.MyModule`) changes the loss by overriding `compute_loss`, or the step.
The test writes per-class accuracy and the confusion matrix to the run folder (`evaluation.py`).
"""
from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.transforms import v2

from lightcnn.layers import Impl
from lightcnn.models import create
from lightcnn.training import evaluation
from lightcnn.training.init_weights import TWINS, load_init_weights, read_state_dict, twin_libraries


class ClassifierModule(L.LightningModule):
    """Train, validate and test a registered network with cross-entropy; log loss, top-1/top-5 and LR.

    Args:
        model: registered model name (`lightcnn.models.list_models()`), e.g. "wrn28_10"; or your own network
            as "package.module:builder" (any callable returning an nn.Module, called with `num_classes`,
            `in_chans` and `model_kwargs`); or a name a package registers in the entry-point group
            `lightcnn.models`.
        optimizer: the optimiser, e.g. `{class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}`.
            Needed to train; None (the default) lets `load_from_checkpoint(path)` build a module for
            evaluation with no further argument.
        lr_scheduler: optional LR scheduler, e.g. `torch.optim.lr_scheduler.MultiStepLR` with
            `milestones`; `ReduceLROnPlateau` watches `lr_monitor`.
        model_kwargs: keyword overrides for the model builder (e.g. `drop_rate: 0.3`).
        impl: the implementation of the network's kernel-backed layers (LRN, the fused BN-ReLU-Conv, DenseNet's
            op): "auto" (the kernel where it was measured faster), "kernel", "reference" (plain PyTorch);
            None: the network's default, "auto". Only networks with such layers take it.
        num_classes: classes of the classifier; linked from the datamodule by the CLI.
        in_chans: input channels; linked from the datamodule by the CLI.
        lr_interval: step the scheduler every "epoch" or every "step" (iteration-based recipes such as
            ResNet's 32k/48k/64k iterations on CIFAR).
        lr_monitor: metric that a `ReduceLROnPlateau` scheduler watches.
        warmup_steps: the first `warmup_steps` optimiser steps run at `warmup_factor` x the LR (He et al.
            2016, Sec. 4.2: 0.01 instead of 0.1 for ~400 iterations on ResNet-110). 0 turns it off.
        warmup_factor: LR multiplier during warm-up ("constant"), or at its first step ("linear").
        warmup: "constant" (the papers' fixed lower LR) or "linear": the multiplier rises linearly from
            `warmup_factor` to 1 over `warmup_steps` optimiser steps, on top of any scheduler (a linear
            warm-up into cosine, step or plateau schedules, written in the YAML).
        label_smoothing: cross-entropy label smoothing (0 in all the classic papers).
        aux_loss_weights: weight of each auxiliary head's loss for networks that return
            `(logits, *aux_logits)` while training; one number for all heads or one per head
            (GoogLeNet, Szegedy et al. 2015, Sec. 5: 0.3).
        channels_last: run the network in channels-last memory format (faster convolutions on GPUs).
        compile: `torch.compile` the inner network (not the LightningModule); checkpoints keep plain keys.
        init_weights: starting weights: a lightcnn checkpoint or state_dict, or the torchvision/timm
            state_dict of a twin architecture (`init_weights.py`); a classifier of another class count
            stays freshly initialised.
        mixup_alpha: MixUp's Beta(alpha, alpha) (Zhang et al. 2018; 0.2 on ImageNet); 0 turns it off.
        cutmix_alpha: CutMix's Beta(alpha, alpha) (Yun et al. 2019; 1.0); 0 turns it off. With both on,
            each batch gets one of the two at random.
        weight_decay_norm_bias: apply the optimiser's weight decay to normalisation weights and biases
            too (True, the papers); False exempts every parameter of fewer than 2 dimensions.
    """

    def __init__(
        self,
        model: str,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        model_kwargs: dict[str, Any] | None = None,
        impl: Impl | None = None,
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
        warmup: Literal["constant", "linear"] = "constant",
        init_weights: str | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        weight_decay_norm_bias: bool = True,
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if warmup_steps < 0 or warmup_factor <= 0:
            raise ValueError(f"need warmup_steps >= 0 and warmup_factor > 0, got {warmup_steps}, {warmup_factor}")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0 (0: off), got {mixup_alpha}, {cutmix_alpha}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self._make_optimizer, self._make_scheduler = optimizer, lr_scheduler
        kwargs = dict(model_kwargs or {})
        if impl is not None:
            if "impl" in kwargs:
                raise ValueError("impl is given twice, as impl and as model_kwargs.impl: keep one")
            kwargs["impl"] = impl
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        self.net: nn.Module = create(model, num_classes=num_classes, **kwargs)
        if init_weights:
            state = read_state_dict(init_weights)
            libraries = twin_libraries(model, state, set(self.net.state_dict()))
            if libraries and any(k not in kwargs for k in TWINS[(libraries[0], model)].overrides):
                # the other library's layout (e.g. torchvision's ResNet stride placement), unless set explicitly
                kwargs = {**TWINS[(libraries[0], model)].overrides, **kwargs}
                self.net = create(model, num_classes=num_classes, **kwargs)
            load_init_weights(self.net, model, state, init_weights)
        self.num_classes = num_classes if num_classes is not None else self.net.num_classes
        self.class_names: list[str] | None = None  # from the data module at fit, saved in the checkpoint
        self.train_metrics = self._metrics("train/")
        self.val_metrics = self._metrics("val/")
        self.test_metrics = self._metrics("test/")
        self.test_confusion = MulticlassConfusionMatrix(self.num_classes)
        mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=self.num_classes)] if mixup_alpha else []
        mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=self.num_classes)] if cutmix_alpha else []
        self._mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes) if mixes else None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's, without reloading `init_weights` (the checkpoint holds the trained weights)."""
        kwargs.setdefault("init_weights", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def _metrics(self, prefix: str) -> MetricCollection:
        # micro average = the fraction of correctly classified images, the papers' accuracy.
        ks = [k for k in (1, 5) if k == 1 or self.num_classes > k]
        return MetricCollection(
            {f"acc{k}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro") for k in ks}, prefix=prefix
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.class_names = list(getattr(datamodule, "class_names", None) or []) or self.class_names
            self.eval_config = evaluation.data_eval_config(datamodule)
            self.example_input_array = evaluation.example_input(self.net, self.eval_config)
            if stage == "fit":
                evaluation.warn_input_size_mismatch(self.hparams.model, self.hparams.model_kwargs or {}, self.net,
                                                    self.eval_config)
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

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one head: cross-entropy with label smoothing. `target` holds class indices, or class
        probabilities (N, C) under MixUp/CutMix. Override it in a subclass to train with another loss."""
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)

    def _step(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        target = y
        if stage == "train" and self._mix is not None:
            x, target = self._mix(x, y)  # soft targets; the accuracy below stays against the hard labels
        out = self(x)
        # Networks with auxiliary classifiers return (logits, *aux_logits) while training (a named tuple).
        logits, aux = (out[0], out[1:]) if isinstance(out, (tuple, list)) else (out, ())
        loss = self.compute_loss(logits, target)
        if aux:
            main_loss = loss
            for w, a in zip(self._aux_weights(len(aux)), aux):
                loss = loss + w * self.compute_loss(a, target)
            self.log(f"{stage}/loss_main", main_loss, on_step=False, on_epoch=True, sync_dist=True)
        metrics.update(logits.detach(), y)
        if stage == "test":
            self.test_confusion.update(logits.detach(), y)
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

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_test_epoch_end(self) -> None:
        self._confusion = self.test_confusion.compute()  # synchronised over the processes: every rank calls it

    def on_test_end(self) -> None:
        if self.trainer.is_global_zero and getattr(self, "_confusion", None) is not None:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
            evaluation.write_test_report(evaluation.run_folder(self.trainer), self._confusion, self.class_names,
                                         metrics)

    def on_fit_start(self) -> None:
        facts: dict[str, int] = {}
        dm = getattr(self.trainer, "datamodule", None)
        accumulate = self.trainer.accumulate_grad_batches
        if getattr(dm, "batch_size", None):
            facts["global_batch"] = dm.batch_size * accumulate
            if accumulate > 1:
                rank_zero_info(f"lightcnn: effective global batch {facts['global_batch']} per optimiser step "
                               f"(batch_size {dm.batch_size} x accumulate_grad_batches {accumulate})")
        if not self.trainer.loggers and not any(isinstance(cb, ModelSummary) for cb in self.trainer.callbacks):
            return  # no logger and no summary: nothing to report to, so no extra forward pass to count MACs
        facts.update(evaluation.params_and_macs(self.net, getattr(self, "example_input_array", None)))
        rank_zero_info("lightcnn: model " + ", ".join(f"{k} {v:,}" for k, v in facts.items()))
        for logger in self.trainer.loggers:
            logger.log_hyperparams({("data/" if k == "global_batch" else "model/") + k: v for k, v in facts.items()})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # What `lightcnn.predict` needs to read a run's images the way its evaluation did.
        facts = checkpoint.setdefault("lightcnn", {})
        facts.update(class_names=self.class_names, eval=getattr(self, "eval_config", None))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        facts = checkpoint.get("lightcnn") or {}
        self.class_names = facts.get("class_names") or self.class_names
        if facts.get("eval"):
            self.eval_config = facts["eval"]

    def _lr_factor(self) -> float:
        steps, factor = self.hparams.warmup_steps, self.hparams.warmup_factor
        if self.global_step >= steps:
            return 1.0
        if self.hparams.warmup == "linear":
            return factor + (1.0 - factor) * self.global_step / steps
        return factor

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

    def parameter_groups(self) -> list[dict] | Any:
        """The optimiser's parameters: all of them, or with `weight_decay_norm_bias=False` two groups, the
        second (normalisation weights and biases: every tensor of fewer than 2 dimensions) without decay."""
        if self.hparams.weight_decay_norm_bias:
            return self.parameters()
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim > 1]},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]

    def configure_optimizers(self):
        if self._make_optimizer is None:
            raise ValueError("ClassifierModule has no optimizer: set model.optimizer in the recipe, e.g. "
                             "{class_path: torch.optim.SGD, init_args: {lr: 0.1, momentum: 0.9}}")
        optimizer = self._make_optimizer(self.parameter_groups())
        if self._make_scheduler is None:
            return optimizer
        scheduler = self._make_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.lr_interval,
                             "monitor": self.hparams.lr_monitor},
        }
