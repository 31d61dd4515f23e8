"""Random images and labels of any shape, for benchmarks and smoke tests (no files, no download)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lightcnn.data.base import ClassificationDataModule


class SyntheticImages(Dataset):
    """`length` reproducible random images: sample `i` is drawn from a generator seeded with `seed + i`."""

    def __init__(self, length: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0):
        self.length, self.shape, self.num_classes, self.seed = length, tuple(shape), num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed + i)
        return torch.randn(self.shape, generator=g), int(torch.randint(self.num_classes, (), generator=g))


class SyntheticDataModule(ClassificationDataModule):
    """Synthetic data shaped like a real data set (e.g. 3x224x224, 1000 classes) to time a model.

    Args:
        num_classes: number of classes of the random labels.
        in_chans: image channels.
        image_size: image side; None: the network's input side (`default_cfg`), else 224.
        num_samples: images per epoch in the train split (val and test get a quarter each).
        batch_size: global batch size (all processes together).
        num_workers: loader workers per process.
        seed: seed of the images.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        image_size: int | None = None,
        num_samples: int = 1024,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if min(num_classes, in_chans, image_size or 1, num_samples) < 1:
            raise ValueError("num_classes, in_chans, image_size and num_samples must all be positive")
        self.num_classes, self.in_chans, self.image_size = num_classes, in_chans, image_size
        self.num_samples, self.seed = num_samples, seed

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        side = self.resolve_data_config(dict(image_size=224), image_size=self.image_size)["image_size"]
        shape = (self.in_chans, side, side)
        n_eval = max(1, self.num_samples // 4)
        self.train_set = SyntheticImages(self.num_samples, shape, self.num_classes, self.seed)
        self.val_set = SyntheticImages(n_eval, shape, self.num_classes, self.seed + self.num_samples)
        self.test_set = SyntheticImages(n_eval, shape, self.num_classes, self.seed + self.num_samples + n_eval)
