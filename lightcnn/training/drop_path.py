"""`ScheduledDropPath` under the class path the documentation has used: it lives in `lightcnn.training.callbacks`."""
from lightcnn.training.callbacks import ScheduledDropPath

__all__ = ["ScheduledDropPath"]
