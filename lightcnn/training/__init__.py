"""Training: the LightningModule (`ClassifierModule`), the papers' training tricks as callbacks
(`callbacks.py`) and the W&B logger; the command line behind `lightcnn.fit`/`lightcnn.test` is `cli.py`."""
from lightcnn.training.callbacks import RenormalizeFilters, ScheduledDropPath
from lightcnn.training.module import ClassifierModule
from lightcnn.training.wandb_utils import WandbLogger

__all__ = ["ClassifierModule", "RenormalizeFilters", "ScheduledDropPath", "WandbLogger"]
