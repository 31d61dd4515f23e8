"""LeNet-5 (LeCun, Bottou, Bengio, Haffner 1998, "Gradient-based learning applied to document recognition").

`lenet5` is the form everyone trains today: dense C3, tanh, average-pool subsampling, a 10-way linear
output, on 32x32 grey images.
"""
from __future__ import annotations

import torch
from torch import nn

from lightcnn.models.base import DIGITS_MEAN, DIGITS_STD, Classifier
from lightcnn.models.registry import register_model


class LeNet5(Classifier):
    """LeNet-5 with a dense C3.

    Args:
        num_classes: output classes (10 digits in the paper).
        in_chans: input channels (1: grey images).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.num_classes, self.in_chans, self.num_features = num_classes, in_chans, 84
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 6, 5), nn.Tanh(), nn.AvgPool2d(2),  # C1, S2: 6 x 14 x 14
            nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2),  # C3, S4: 16 x 5 x 5
            nn.Conv2d(16, 120, 5), nn.Tanh(),  # C5: 120 x 1 x 1
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(120, 84), nn.Tanh())  # F6
        self.classifier = nn.Linear(84, num_classes)
        self.default_cfg = dict(input_size=(in_chans, 32, 32), mean=DIGITS_MEAN * in_chans,
                                std=DIGITS_STD * in_chans, dataset="digits", num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc(x)
        return x if pre_logits else self.classifier(x)


@register_model
def lenet5(**kwargs) -> LeNet5:
    """LeNet-5 as trained today: dense C3, tanh, average pooling, linear output; 61,706 parameters."""
    return LeNet5(**kwargs)
