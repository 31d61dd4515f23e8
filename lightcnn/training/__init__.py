"""Training: the LightningModule (`ClassifierModule`); the command line behind `lightcnn.fit`/`lightcnn.test` is `cli.py`."""
from lightcnn.training.module import ClassifierModule

__all__ = ["ClassifierModule"]
