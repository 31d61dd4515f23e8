"""Datamodules on real formats: scikit-learn's digits, CIFAR python pickles and ImageFolder trees that
the tests write themselves (no network), plus the global-batch-size rule."""
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from lightcnn.constants import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from lightcnn.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    EpochSeededRandomSampler,
    ImageNetDataModule,
    SyntheticDataModule,
)
from lightcnn.data.cifar import Cutout
from lightcnn.data.digits import load_digits_tensors
from lightcnn.data.imagenet import imagenet_transforms
from tests.helpers import write_cifar, write_folder_tree


def _attach(dm, world_size: int, net=None):
    """A stand-in trainer: its world size and, optionally, the LightningModule whose `net` the data feeds."""
    dm.trainer = SimpleNamespace(world_size=world_size, lightning_module=SimpleNamespace(net=net))
    return dm


def _net(**cfg):
    return SimpleNamespace(default_cfg=cfg)


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


def test_digits_take_input_size_and_normalisation_from_the_network():
    from lightcnn.models import create

    # lenet5_original declares LeCun et al.'s scaling (Sec. II.A): background -0.1, ink 1.175.
    dm = _attach(DigitsDataModule(), 1, create("lenet5_original"))
    dm.setup("fit")
    x = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert x.shape[1:] == (1, 32, 32)
    assert x.min().item() == pytest.approx(-0.1) and x.max().item() == pytest.approx(1.175)
    # A 1-channel network built for 64x64 inputs gets 64x64 digits, the digit scaled with the field.
    dm = _attach(DigitsDataModule(), 1, _net(input_size=(1, 64, 64), mean=(0.0,), std=(1.0,)))
    dm.setup("fit")
    x64 = dm.train_set[0][0]
    assert x64.shape == (1, 64, 64) and x64.min() == 0 and torch.all(x64[:, :8] == 0) and x64[:, 8:56].max() > 0


def test_digits_recipe_values_win_over_the_network():
    dm = _attach(DigitsDataModule(image_size=28, mean=(0.2,), std=(0.4,)), 1,
                 _net(input_size=(1, 64, 64), mean=(0.0,), std=(1.0,)))
    dm.setup("fit")
    x = dm.train_set[0][0]
    assert x.shape == (1, 28, 28) and x.min().item() == pytest.approx(-0.5)  # background (0 - 0.2) / 0.4
    alone = DigitsDataModule()  # no network: the data set's own 32x32, 0.5/0.5
    alone.setup("fit")
    assert alone.train_set[0][0].shape == (1, 32, 32) and alone.train_set[0][0].min() == -1.0


def test_normalisation_with_the_wrong_channel_count_is_an_error():
    dm = _attach(DigitsDataModule(), 1, _net(input_size=(3, 32, 32), mean=CIFAR10_MEAN, std=CIFAR10_STD))
    with pytest.raises(ValueError, match=r"mean=.* has 3 values but the data has 1 channel"):
        dm.setup("fit")


def test_digits_bad_fractions_are_an_error():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.6)


# --- CIFAR ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_reads_the_official_pickle_format(tmp_path, hundred):
    files = write_cifar(tmp_path, hundred)
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
    xb, yb = dm.materialise(next(iter(dm.train_dataloader())))  # the batched pipeline's batch as a tensor
    assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and yb.shape == (4,)


@pytest.mark.parametrize("padding_mode", ["zero", "mean", "reflect"])
def test_cifar_augmentation_is_pad4_crop_and_flip(tmp_path, padding_mode):
    write_cifar(tmp_path, hundred=False)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, padding_mode=padding_mode, verify_md5=False,
                           num_workers=0)
    dm.setup("fit")
    img = dm.train_set.data[0]  # HWC uint8
    x = torch.stack([dm.train_set[0][0] for _ in range(40)])
    x = x * torch.tensor(CIFAR10_STD)[:, None, None] + torch.tensor(CIFAR10_MEAN)[:, None, None]
    ref = torch.as_tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255
    if padding_mode == "reflect":
        padded = torch.nn.functional.pad(ref[None], (4, 4, 4, 4), mode="reflect")[0]
    else:  # black, or the data set's mean colour
        fill = torch.zeros(3) if padding_mode == "zero" else torch.tensor(CIFAR10_MEAN)
        padded = fill[:, None, None].expand(3, 40, 40).clone()
        padded[:, 4:36, 4:36] = ref
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
    assert any((dy, dx) != (4, 4) for dy, dx, _ in found)  # some crops hold padding, of the chosen kind


def test_cifar_padding_mode_and_cutout_knobs_are_checked():
    with pytest.raises(ValueError, match="padding_mode"):
        CIFAR10DataModule(padding_mode="edge")
    with pytest.raises(ValueError, match="needs augment"):
        CIFAR10DataModule(augment=False, cutout=16)
    with pytest.raises(ValueError, match="cutout"):
        CIFAR10DataModule(cutout=-1)


def test_cutout_zeroes_one_square_centred_anywhere_in_the_image():
    length, side, n = 16, 32, 3000
    x = torch.rand(n, 3, side, side) + 1  # no zeros of its own
    out = torch.stack([Cutout(length)(img) for img in x])
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # the same square in every channel
    assert torch.equal(out[~zero], x[~zero])  # the rest untouched
    rows, cols = zero[:, 0].any(2), zero[:, 0].any(1)
    heights, widths = rows.sum(1), cols.sum(1)
    assert torch.equal(zero[:, 0].sum((1, 2)), heights * widths)  # a rectangle (rows x columns)...
    for r in (rows, cols):  # ...of contiguous rows and columns
        first, last = r.float().argmax(1), side - 1 - r.flip(1).float().argmax(1)
        assert torch.equal(last - first + 1, r.sum(1))
    # Centre uniform over all pixels: a square crossing the border is clipped, so its mean side is the
    # mean over the centres c of min(c + L/2, side) - max(c - L/2, 0) (DeVries & Taylor's own clipping).
    c = torch.arange(side)
    expected = ((c + length // 2).clamp(max=side) - (c - length // 2).clamp(min=0)).float().mean().item()
    assert heights.max() == widths.max() == length and heights.min() == widths.min() == length // 2
    assert heights.float().mean().item() == pytest.approx(expected, rel=0.03)
    assert widths.float().mean().item() == pytest.approx(expected, rel=0.03)


def test_cifar_cutout_applies_to_training_images_only(tmp_path):
    write_cifar(tmp_path, hundred=False)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, cutout=8, verify_md5=False, num_workers=0)
    dm.setup("fit")
    zeros = [(dm.train_set[i][0] == 0).sum().item() for i in range(8)]
    assert all(3 * 4 * 4 <= z for z in zeros)  # at least a clipped (4x4) square in all three channels
    assert (dm.test_set[0][0] == 0).sum() == 0


def test_cifar_normalisation_comes_from_the_network_unless_the_recipe_sets_it(tmp_path):
    write_cifar(tmp_path, hundred=False)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)

    def background(dm):  # an all-black image's value after normalisation: -mean / std
        dm.setup("fit")
        dm.test_set.data[0] = 0
        return dm.test_set[0][0][:, 0, 0]

    own = CIFAR10DataModule(root=str(tmp_path), verify_md5=False)
    from_net = _attach(CIFAR10DataModule(root=str(tmp_path), verify_md5=False), 1, _net(mean=mean, std=std))
    recipe = _attach(CIFAR10DataModule(root=str(tmp_path), verify_md5=False, mean=(0.5,) * 3, std=(0.25,) * 3), 1,
                     _net(mean=mean, std=std))
    torch.testing.assert_close(background(own), -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD))
    torch.testing.assert_close(background(from_net), -torch.tensor(mean) / torch.tensor(std))
    torch.testing.assert_close(background(recipe), torch.full((3,), -2.0))


def test_cifar_val_split_is_held_out_of_training(tmp_path):
    write_cifar(tmp_path, hundred=False, n_train=20)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, val_size=5, verify_md5=False, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_set) == 5
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)


def test_cifar_missing_says_how_to_get_it(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4)
    with pytest.raises(FileNotFoundError, match=r"--data.download true.*cifar-10-python.tar.gz"):
        dm.setup("fit")


def test_cifar_md5_check_rejects_files_that_are_not_the_official_ones(tmp_path):
    write_cifar(tmp_path, hundred=False)
    with pytest.raises(FileNotFoundError, match="MD5"):
        CIFAR10DataModule(root=str(tmp_path), batch_size=4).setup("fit")


# --- ImageNet folders ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("augmentation", ["alexnet", "scale", "inception"])
def test_imagenet_folder_tree(tmp_path, augmentation):
    write_folder_tree(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, augmentation=augmentation, image_size=16,
                            resize_size=20, scale_range=(16, 24), num_classes=3, num_workers=0)
    dm.setup("fit")
    assert dm.val_set is dm.test_set and len(dm.train_set) == len(dm.val_set) == 9
    assert dm.train_set.classes == ["n01", "n02", "n03"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 16, 16) and yv.tolist() == [0, 0]


def test_imagenet_center_square_crops_inside_the_central_square_only():
    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)  # landscape: H 30, W 40
    resized = v2.Resize(20)(img).float() / 255  # shorter side 20: 20 x 26, the central square at columns 3..22
    left = (resized.shape[-1] - 20) // 2

    def columns(center_square):
        tf = imagenet_transforms("alexnet", 16, 20, mean=(0.0,) * 3, std=(1.0,) * 3, center_square=center_square)
        found = set()
        for _ in range(60):
            out = tf(img)
            hits = [(dx, f) for dy in range(5) for dx in range(resized.shape[-1] - 15) for f in (0, 1)
                    if torch.allclose((out.flip(-1) if f else out), resized[:, dy:dy + 16, dx:dx + 16], atol=1e-6)]
            assert hits, "the output is not a 16x16 crop of the resized image"
            found |= {dx for dx, _ in hits}
        return found

    assert columns(True) <= set(range(left, left + 5))  # every crop inside the central 20x20 square
    assert not columns(False) <= set(range(left, left + 5))  # without it crops reach the sides


def test_imagenet_takes_size_and_normalisation_from_the_network(tmp_path):
    write_folder_tree(tmp_path)
    net = _net(input_size=(3, 12, 12), mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=0.75)  # resize to 12 / 0.75 = 16
    dm = _attach(ImageNetDataModule(root=str(tmp_path), batch_size=2, augmentation="alexnet", num_classes=3,
                                    num_workers=0), 1, net)
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 12, 12) and x.min() >= 0  # no ImageNet normalisation: the network's 0/1
    ref = v2.CenterCrop(12)(v2.Resize(16)(v2.ToImage()(Image.open(dm.val_set.samples[0][0]).convert("RGB"))))
    torch.testing.assert_close(x[0], ref.float() / 255)
    with pytest.raises(ValueError, match="center_square"):
        ImageNetDataModule(augmentation="scale", center_square=True)


def test_imagenet_class_count_is_checked(tmp_path):
    write_folder_tree(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=2, image_size=16, resize_size=20, num_workers=0,
                            num_classes=1000)
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

def test_synthetic_images_take_the_network_s_input_size_in_a_real_fit():
    import lightning as L

    from lightcnn.training import ClassifierModule

    sizes = []

    class Net64(torch.nn.Module):  # a network built for 64x64 inputs, as its default_cfg says
        default_cfg = dict(input_size=(3, 64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)

        def __init__(self):
            super().__init__()
            self.num_classes, self.fc = 5, torch.nn.Linear(3 * 64 * 64, 5)

        def forward(self, x):
            sizes.append(tuple(x.shape[1:]))
            return self.fc(x.flatten(1))

    module = ClassifierModule("lenet5", lambda p: torch.optim.SGD(p, lr=0.1), num_classes=5)
    module.net = Net64()
    dm = SyntheticDataModule(num_classes=5, in_chans=3, num_samples=8, batch_size=4)
    L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)
    assert sizes == [(3, 64, 64)] * 2
    assert SyntheticDataModule(image_size=40).image_size == 40


def test_synthetic_is_reproducible_and_shaped():
    dm = SyntheticDataModule(num_classes=7, in_chans=2, image_size=8, num_samples=16, batch_size=4)
    dm.setup()
    x, y = dm.train_set[3]
    assert x.shape == (2, 8, 8) and 0 <= y < 7
    x2, y2 = dm.train_set[3]
    assert torch.equal(x, x2) and y == y2 and not torch.equal(x, dm.train_set[4][0])
    assert len(dm.train_set) == 16 and len(dm.val_set) == len(dm.test_set) == 4
