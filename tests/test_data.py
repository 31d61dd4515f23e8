"""Datamodules on real formats: scikit-learn's digits, CIFAR python pickles and ImageFolder trees that
the tests write themselves (no network), plus the global-batch-size rule."""
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from lightcnn.data import (
    CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule, EpochSeededRandomSampler, ImageNetDataModule,
    SyntheticDataModule,
)
from lightcnn.data.digits import load_digits_tensors
from lightcnn.constants import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD


def _attach(dm, world_size: int):
    dm.trainer = SimpleNamespace(world_size=world_size)
    return dm


# --- global batch size ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("world, per_device", [(1, 32), (2, 16), (4, 8), (8, 4)])
def test_batch_size_is_global_and_split_over_the_processes(world, per_device):
    dm = _attach(DigitsDataModule(batch_size=32), world)
    dm.setup("fit")
    assert dm.batch_size_per_device == per_device
    assert next(iter(dm.train_dataloader()))[0].shape[0] == per_device


def test_batch_size_that_does_not_divide_the_world_size_is_an_error():
    dm = _attach(DigitsDataModule(batch_size=30), 4)
    with pytest.raises(ValueError, match=r"batch_size=30 .* world size 4.* 28 or 32"):
        dm.setup("fit")


def test_epoch_seeded_sampler_depends_on_seed_and_epoch_only():
    s = EpochSeededRandomSampler(range(100), seed=3)
    s.set_epoch(1)
    first = list(s)
    torch.manual_seed(123)  # the global RNG must not matter
    again = list(s)
    s.set_epoch(2)
    assert first == again and sorted(first) == list(range(100)) and list(s) != first


# --- digits --------------------------------------------------------------------------------------------------

def test_digits_are_the_sklearn_images_resized_and_padded():
    from sklearn.datasets import load_digits

    x, y = load_digits_tensors(image_size=32, digit_size=24)
    assert x.shape == (1797, 1, 32, 32) and y.shape == (1797,)
    assert torch.equal(y, torch.as_tensor(load_digits().target))
    background = (0.0 - 0.5) / 0.5
    assert torch.all(x[:, :, :4] == background) and torch.all(x[:, :, -4:] == background)  # the 4-pixel border
    assert x.max() <= 1.0 and x.min() >= -1.0
    x8, _ = load_digits_tensors(image_size=8, digit_size=8)  # no resize, no pad: the raw grey levels / 16
    torch.testing.assert_close(x8[:, 0] * 0.5 + 0.5, torch.as_tensor(load_digits().images, dtype=torch.float32) / 16)


def test_digits_split_is_seeded_disjoint_and_complete():
    a, b, c = DigitsDataModule(), DigitsDataModule(), DigitsDataModule(split_seed=1)
    for dm in (a, b, c):
        dm.setup()
    sets = [a.train_set.indices, a.val_set.indices, a.test_set.indices]
    assert sorted(sum(sets, [])) == list(range(1797))
    assert [len(s) for s in sets] == [1258, 180, 359]
    assert a.test_set.indices == b.test_set.indices != c.test_set.indices


def test_digits_bad_fractions_are_an_error():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.6)


# --- CIFAR ---------------------------------------------------------------------------------------------------

def _write_cifar(root, hundred: bool, n_train: int = 12, n_test: int = 6, seed: int = 0):
    """A small CIFAR in the official python format: pickled dicts of uint8 rows (3 x 32 x 32, CHW)."""
    rng = np.random.default_rng(seed)
    label_key, folder = ("fine_labels", "cifar-100-python") if hundred else ("labels", "cifar-10-batches-py")
    classes = 100 if hundred else 10
    d = root / folder
    d.mkdir(parents=True)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: rng.integers(0, classes, n).tolist()}

    files = {"train": batch(n_train), "test": batch(n_test)} if hundred else {
        **{f"data_batch_{i}": batch(n_train // 5 + (i == 1) * (n_train % 5)) for i in range(1, 6)},
        "test_batch": batch(n_test)}
    for name, content in files.items():
        with open(d / name, "wb") as f:
            pickle.dump(content, f)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else {"label_names": [f"c{i}" for i in range(10)]}
    with open(d / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    return files


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_reads_the_official_pickle_format(tmp_path, hundred):
    files = _write_cifar(tmp_path, hundred)
    cls, (mean, std) = (CIFAR100DataModule, (CIFAR100_MEAN, CIFAR100_STD)) if hundred else (
        CIFAR10DataModule, (CIFAR10_MEAN, CIFAR10_STD))
    dm = cls(root=str(tmp_path), batch_size=4, verify_md5=False, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == (100 if hundred else 10) and dm.in_chans == 3
    assert len(dm.train_set) == 12 and dm.val_set is dm.test_set and len(dm.test_set) == 6
    test_name = "test" if hundred else "test_batch"
    label_key = "fine_labels" if hundred else "labels"
    x, y = dm.test_set[2]  # evaluation transform: only normalisation, so it inverts exactly
    raw = torch.as_tensor(files[test_name]["data"][2].reshape(3, 32, 32), dtype=torch.float32) / 255
    torch.testing.assert_close(x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None], raw)
    assert y == files[test_name][label_key][2]
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and yb.shape == (4,)


def test_cifar_augmentation_is_pad4_crop_and_flip(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, verify_md5=False, num_workers=0)
    dm.setup("fit")
    img = dm.train_set.data[0]  # HWC uint8
    x = torch.stack([dm.train_set[0][0] for _ in range(40)])
    x = x * torch.tensor(CIFAR10_STD)[:, None, None] + torch.tensor(CIFAR10_MEAN)[:, None, None]
    ref = torch.as_tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255
    padded = torch.nn.functional.pad(ref, (4, 4, 4, 4))
    crops = {(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)}

    def which(sample):
        for dy, dx, f in crops:
            c = padded[:, dy:dy + 32, dx:dx + 32]
            if torch.allclose(c.flip(-1) if f else c, sample, atol=1e-5):
                return dy, dx, f
        return None

    found = [which(s) for s in x]
    assert None not in found  # every sample is a 32x32 crop of the 4-padded image, maybe flipped
    assert len(set(found)) > 1 and {f for _, _, f in found} == {0, 1}


def test_cifar_val_split_is_held_out_of_training(tmp_path):
    _write_cifar(tmp_path, hundred=False, n_train=20)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, val_size=5, verify_md5=False, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)


def test_cifar_missing_says_how_to_get_it(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"--data.download true.*cifar-10-python.tar.gz"):
        dm.setup("fit")


def test_cifar_md5_check_rejects_files_that_are_not_the_official_ones(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    with pytest.raises(FileNotFoundError, match="MD5"):
        CIFAR10DataModule(root=str(tmp_path), batch_size=4).setup("fit")


# --- ImageNet folders ----------------------------------------------------------------------------------------

def _write_folder_tree(root, classes=("n01", "n02", "n03"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
                img.save(root / split / c / f"{j}.{'JPEG' if j % 2 else 'png'}")


@pytest.mark.parametrize("augmentation", ["alexnet", "scale", "inception"])
def test_imagenet_folder_tree(tmp_path, augmentation):
    _write_folder_tree(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, augmentation=augmentation, image_size=16,
                            resize_size=20, scale_range=(16, 24), num_classes=3, num_workers=0)
    dm.setup("fit")
    assert dm.val_set is dm.test_set and len(dm.train_set) == len(dm.val_set) == 9
    assert dm.train_set.classes == ["n01", "n02", "n03"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 16, 16) and yv.tolist() == [0, 0]


def test_imagenet_class_count_is_checked(tmp_path):
    _write_folder_tree(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, image_size=16, resize_size=20, num_workers=0)
    with pytest.raises(ValueError, match="3 class folders but num_classes=1000"):
        dm.setup("fit")


def test_imagenet_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="image-net.org"):
        ImageNetDataModule(root=str(tmp_path), batch_size=2).setup("fit")


def test_imagenet_bad_augmentation_knobs_are_errors():
    with pytest.raises(ValueError, match="scale_range"):
        ImageNetDataModule(augmentation="scale", scale_range=(480, 256))
    with pytest.raises(ValueError, match="resize_size"):
        ImageNetDataModule(image_size=224, resize_size=200)


# --- synthetic -----------------------------------------------------------------------------------------------

def test_synthetic_is_reproducible_and_shaped():
    dm = SyntheticDataModule(num_classes=7, in_chans=2, image_size=8, num_samples=16, batch_size=4)
    dm.setup()
    x, y = dm.train_set[3]
    assert x.shape == (2, 8, 8) and 0 <= y < 7
    x2, y2 = dm.train_set[3]
    assert torch.equal(x, x2) and y == y2 and not torch.equal(x, dm.train_set[4][0])
    assert len(dm.train_set) == 16 and len(dm.val_set) == len(dm.test_set) == 4
