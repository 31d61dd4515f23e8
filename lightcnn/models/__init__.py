"""Every network of lightcnn, by name: `lightcnn.models.create("wrn28_10", num_classes=10)`.

Importing this package imports each family file, whose builders register themselves.
"""
from lightcnn.models.registry import create, is_model, list_models, register_model, register_model_pattern

# Family files (each registers its builders on import).
from lightcnn.models import lenet  # noqa: F401,E402
from lightcnn.models import alexnet, googlenet, vgg, zfnet  # noqa: F401,E402
from lightcnn.models import resnet, resnext, sd_resnet  # noqa: F401,E402
from lightcnn.models import preact_resnet, wide_resnet  # noqa: F401,E402
from lightcnn.models import densenet  # noqa: F401,E402
from lightcnn.models import fractalnet, inception_resnet, inception_v4  # noqa: F401,E402
from lightcnn.models import nasnet  # noqa: F401,E402

__all__ = ["create", "is_model", "list_models", "register_model", "register_model_pattern"]
