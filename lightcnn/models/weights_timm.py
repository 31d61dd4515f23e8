"""`from_timm` under the import path the documentation has used: it lives in `lightcnn.models.weights`."""
from lightcnn.models.weights import from_timm

__all__ = ["from_timm"]
