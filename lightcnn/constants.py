"""Facts about the data sets the papers trained on: normalisation, native input size, class count.

A leaf module (it imports nothing of lightcnn), so that both `lightcnn.data` and `lightcnn.models`
can use it without one loading the other (timm's `timm/data/constants.py`).
"""
from __future__ import annotations

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
DIGITS_MEAN, DIGITS_STD = (0.5,), (0.5,)

# name -> (mean, std, native input side, classes); mean/std are per RGB channel (one value for digits).
DATASETS: dict[str, dict] = {
    "imagenet": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, input_side=224, num_classes=1000),
    "cifar10": dict(mean=CIFAR10_MEAN, std=CIFAR10_STD, input_side=32, num_classes=10),
    "cifar100": dict(mean=CIFAR100_MEAN, std=CIFAR100_STD, input_side=32, num_classes=100),
    "digits": dict(mean=DIGITS_MEAN, std=DIGITS_STD, input_side=32, num_classes=10),
}
