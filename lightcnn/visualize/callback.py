"""`FeatureSnapshots`: a Lightning callback that saves the network's weights at chosen epochs, for the
feature-evolution picture (Zeiler & Fergus 2014, Fig. 4) of `python -m lightcnn.visualize --what evolution`.

In an experiment YAML:

    trainer:
      callbacks+:   # after the last-checkpoint callback every recipe inherits
        - class_path: lightcnn.visualize.FeatureSnapshots
          init_args: {epochs: [1, 2, 5, 10, 20, 30]}

Each snapshot is `SNAPSHOTS/epoch=NNNN.pt` holding `state_dict` (keys `net.*`, as a checkpoint of
lightcnn.fit) and the `hyper_parameters` that rebuild the network; `lightcnn.visualize.load_model`
reads it like a checkpoint. SNAPSHOTS is `snapshots/` beside the run's `checkpoints/` by default.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

HPARAMS = ("model", "model_kwargs", "num_classes", "in_chans")


class FeatureSnapshots(L.Callback):
    """Save the network's weights after the chosen epochs (and before training, as epoch 0).

    Args:
        dirpath: folder of the snapshots; None: `snapshots/` beside the run's checkpoint folder, or under
            the trainer's `default_root_dir` when there is none.
        epochs: the epochs (1 = after the first) after which to save; None: every `every_n_epochs`.
        every_n_epochs: the interval when `epochs` is None.
        save_initial: also save the initial weights as epoch 0.
    """

    def __init__(self, dirpath: str | None = None, epochs: Sequence[int] | None = None, every_n_epochs: int = 1,
                 save_initial: bool = True):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.dirpath = dirpath
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.every_n_epochs, self.save_initial = every_n_epochs, save_initial
        self.saved: list[Path] = []

    def _folder(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath).parent / "snapshots"
        return Path(trainer.default_root_dir) / "snapshots"

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        net = getattr(pl_module, "net", None)
        state = ({f"net.{k}": v.detach().cpu().clone() for k, v in net.state_dict().items()} if net is not None
                 else {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()})
        hp = {k: pl_module.hparams[k] for k in HPARAMS if k in pl_module.hparams}
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"epoch={epoch:04d}.pt"
        torch.save({"state_dict": state, "hyper_parameters": hp, "epoch": epoch,
                    "global_step": trainer.global_step}, path)
        self.saved.append(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_initial and trainer.current_epoch == 0:
            self._save(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if (epoch in self.epochs) if self.epochs is not None else epoch % self.every_n_epochs == 0:
            self._save(trainer, pl_module, epoch)
