"""Every network of lightcnn, by name: `lightcnn.models.create("wrn28_10", num_classes=10)`.

Importing this package imports each family file, whose builders register themselves.
`lightcnn.models.load_model(name, checkpoint)` rebuilds a trained network from a checkpoint of `lightcnn.fit`.
"""
# Family files (each registers its builders on import).
from lightcnn.models import (  # noqa: F401
    alexnet,
    densenet,
    fractalnet,
    googlenet,
    inception_resnet,
    inception_v4,
    lenet,
    nasnet,
    preact_resnet,
    resnet,
    resnext,
    sd_resnet,
    vgg,
    wide_resnet,
    zfnet,
)
from lightcnn.models.loading import load_model
from lightcnn.models.registry import create, is_model, list_models, register_model, register_model_pattern

__all__ = ["create", "is_model", "list_models", "load_model", "register_model", "register_model_pattern"]
