"""Training: the LightningModule (`ClassifierModule`) and the CLI's run-folder callback."""
from lightcnn.training.module import ClassifierModule

__all__ = ["ClassifierModule"]
