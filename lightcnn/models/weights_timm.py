"""Import of timm's weights into the lightcnn networks whose architecture equals timm's: `from_timm`.

    import timm
    from lightcnn.models.weights_timm import from_timm
    t = timm.create_model("inception_v4", pretrained=True)    # a module or its state_dict
    model = from_timm("inception_v4", t)                       # same outputs as t in eval mode

The twins are registered beside their layers with `lightcnn.models.weights.register_twin("timm", ...)`
(Inception-v4 and Inception-ResNet-v2 map layer by layer in order: our TF-slim names against timm's
numbered modules); `twins("timm")` lists them. Nothing is downloaded here.
"""
from __future__ import annotations

from torch import nn

from lightcnn.models.weights import StateDict, load_twin


def from_timm(name: str, timm_model_or_state_dict: nn.Module | StateDict, load_classifier: bool = True,
              **overrides) -> nn.Module:
    """lightcnn's `name` with the weights of the timm model of the same architecture (see `twins("timm")`):
    `load_twin("timm", ...)`. The class count is timm's classifier's unless `num_classes` is given;
    `load_classifier=False` keeps a fresh classifier."""
    return load_twin("timm", name, timm_model_or_state_dict, load_classifier, **overrides)
