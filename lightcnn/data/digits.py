"""scikit-learn's handwritten digits (UCI, 1,797 8x8 images of 0-9), the embedded data set of the first run.

No download: the images ship with scikit-learn. Each 8x8 image (grey levels 0..16) is resized to
`digit_size` and padded to `image_size` (32 for LeNet-5: the paper centres 20x20 digits in a 32x32
field so that stroke ends can reach the centre of the top feature detectors' receptive fields), then
normalised with `mean`/`std`. Image size and normalisation default to the network's `default_cfg`
(see `base.py`): LeNet-5's 0.5/0.5, or `lenet5_original`'s paper scaling (background -0.1, ink 1.175).
The train/val/test split is drawn with its own seed (`split_seed`), so the held-out test set stays the
same whatever the training seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset, random_split

from lightcnn.constants import DATASETS, DIGITS_MEAN, DIGITS_STD
from lightcnn.data.base import ClassificationDataModule


def load_digits_tensors(image_size: int = 32, digit_size: int = 24, mean: float = DIGITS_MEAN[0],
                        std: float = DIGITS_STD[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as `(N, 1, image_size, image_size)` float images (ink 1, background 0, then
    `(x - mean) / std`) and int64 labels."""
    from sklearn.datasets import load_digits

    if not 8 <= digit_size <= image_size:
        raise ValueError(f"need 8 <= digit_size <= image_size, got digit_size={digit_size}, image_size={image_size}")
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    x = F.interpolate(x, size=(digit_size, digit_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    before = (image_size - digit_size) // 2
    x = F.pad(x, (before, image_size - digit_size - before) * 2)  # centred, zero (= background) border
    x = (x - mean) / std
    return x.contiguous(), torch.as_tensor(digits.target, dtype=torch.int64)


class DigitsDataModule(ClassificationDataModule):
    """The UCI handwritten digits from scikit-learn, as 32x32 grey images, split train/val/test.

    Args:
        batch_size: global batch size (all processes together).
        val_fraction: share of the 1,797 images held out for validation.
        test_fraction: share held out for the final test.
        split_seed: seed of the split (independent of the training seed).
        image_size: side of the padded image; None: the network's input side (32 without a network).
        digit_size: side the 8x8 digit is resized to before padding; None: 3/4 of `image_size` (24 of 32).
        mean: normalisation mean (one value); None: the network's `default_cfg`, else 0.5.
        std: normalisation std (one value); None as `mean`.
        num_workers: loader workers per process (0: the data is a tensor in memory).
    """

    num_classes = 10
    in_chans = 1

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        image_size: int | None = None,
        digit_size: int | None = None,
        mean: tuple[float] | None = None,
        std: tuple[float] | None = None,
        num_workers: int = 0,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=False)
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction and test_fraction must be in (0, 1) and sum to less than 1, "
                f"got {val_fraction} and {test_fraction}"
            )
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.image_size, self.digit_size, self.mean, self.std = image_size, digit_size, mean, std

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_set is not None:
            return
        facts = DATASETS["digits"]
        cfg = self.resolve_data_config(dict(image_size=facts["input_side"], mean=facts["mean"], std=facts["std"]),
                                       image_size=self.image_size, mean=self.mean, std=self.std)
        digit_size = self.digit_size or round(cfg["image_size"] * 3 / 4)
        x, y = load_digits_tensors(cfg["image_size"], digit_size, cfg["mean"][0], cfg["std"][0])
        n = len(y)
        n_val, n_test = round(n * self.val_fraction), round(n * self.test_fraction)
        self.train_set, self.val_set, self.test_set = random_split(
            TensorDataset(x, y), [n - n_val - n_test, n_val, n_test],
            generator=torch.Generator().manual_seed(self.split_seed),
        )
