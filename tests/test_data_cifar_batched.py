"""The batched CIFAR pipeline (`lightcnn/data/batched.py`): the same tensors as torchvision's per-image
transforms, the papers' distribution of crops and flips, every image once per epoch, the order from
(seed, epoch), DDP shards, the fallback to host memory, and the choice of pipeline."""
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from lightcnn.constants import CIFAR10_MEAN, CIFAR10_STD
from lightcnn.data import CIFAR10DataModule, CIFAR100DataModule
from lightcnn.data.batched import CX, CY, DX, DY, FLIP, BatchAugment, EpochBatches, ImageSet, place
from lightcnn.data.cifar import Cutout, normalised_black
from tests.helpers import write_cifar

ROOT = Path(__file__).resolve().parents[1]


def _torchvision_image(raw: torch.Tensor, mean, std, padding_mode: str, dy: int, dx: int, flip: bool,
                       cutout: int = 0, cy: int = 0, cx: int = 0) -> torch.Tensor:
    """What `cifar_transforms` makes of one uint8 image, given its crop offsets, flip and Cutout centre: the
    same torchvision v2 functionals its RandomCrop and RandomHorizontalFlip call."""
    x = TF.normalize(TF.to_dtype(raw, torch.float32, scale=True), list(mean), list(std))
    if padding_mode == "reflect":
        x = TF.pad(x, [4], padding_mode="reflect")
    else:
        x = TF.pad(x, [4], fill=normalised_black(mean, std) if padding_mode == "zero" else 0.0)
    x = TF.crop(x, dy, dx, 32, 32)
    if flip:
        x = TF.horizontal_flip(x)
    return Cutout.erase(x, cy, cx, cutout) if cutout else x


@pytest.mark.parametrize("padding_mode", ["zero", "mean", "reflect"])
@pytest.mark.parametrize("cutout", [0, 16])
def test_batch_equals_torchvision_per_image_output_for_the_same_crops_flips_and_cutout(tmp_path, padding_mode,
                                                                                      cutout):
    files = write_cifar(tmp_path, hundred=False, n_train=40)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=40, padding_mode=padding_mode, cutout=cutout,
                           verify_md5=False)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    x, y = dm.materialise(batch)
    raw = torch.from_numpy(np.concatenate([files[f"data_batch_{i}"]["data"] for i in range(1, 6)]))
    raw = raw.view(-1, 3, 32, 32)
    p = batch["params"]
    assert {int(v) for v in p[FLIP]} == {0, 1} and len({int(v) for v in p[DY]}) > 3  # the batch covers cases
    for j, i in enumerate(batch["index"].tolist()):
        ref = _torchvision_image(raw[i], CIFAR10_MEAN, CIFAR10_STD, padding_mode, int(p[DY, j]), int(p[DX, j]),
                                 bool(p[FLIP, j]), cutout, int(p[CY, j]), int(p[CX, j]))
        assert torch.equal(x[j], ref), f"image {i} (params {p[:, j].tolist()}) differs from torchvision's"
    assert torch.equal(y, torch.as_tensor(dm.train_set.targets)[batch["index"]])


def test_the_torchvision_pipeline_pads_with_the_value_of_a_black_pixel(tmp_path):
    # "zero" padding holds exactly what a black pixel of the image becomes, in both pipelines.
    black = TF.normalize(torch.zeros(3, 1, 1), list(CIFAR10_MEAN), list(CIFAR10_STD)).flatten()
    assert normalised_black(CIFAR10_MEAN, CIFAR10_STD) == black.tolist()


def test_output_takes_the_network_s_dtype_and_memory_format(tmp_path):
    write_cifar(tmp_path, hundred=False, n_train=10)
    net = torch.nn.Conv2d(3, 4, 3).to(torch.bfloat16, memory_format=torch.channels_last)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=10, verify_md5=False, padding_mode="mean", cutout=8)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, lightning_module=net)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    x, _ = dm.materialise(batch)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, lightning_module=None)
    ref, _ = dm.materialise(batch)
    assert ref.dtype == torch.float32 and ref.is_contiguous()
    assert torch.equal(x, ref.to(torch.bfloat16))


def test_crop_offsets_are_uniform_over_0_to_8_and_flips_happen_half_the_time():
    n = 90_000
    p = BatchAugment(CIFAR10_MEAN, CIFAR10_STD).draw(n, 32, 32, torch.Generator().manual_seed(0))
    for row, values in ((DY, 9), (DX, 9), (CY, 32), (CX, 32)):
        counts = torch.bincount(p[row], minlength=values)
        assert len(counts) == values  # nothing outside 0..values-1
        expected = n / values
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        # 0.1% critical values of chi-square with 8 and 31 degrees of freedom
        assert chi2 < (26.12 if values == 9 else 61.10), f"row {row}: {counts.tolist()}"
    rate = p[FLIP].float().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n) and set(p[FLIP].unique().tolist()) == {0, 1}


def test_every_image_once_per_epoch_in_an_order_from_seed_and_epoch():
    aug = BatchAugment(CIFAR10_MEAN, CIFAR10_STD)

    def epoch(seed, e, **kw):
        s = EpochBatches(1000, 64, shuffle=True, seed=seed, augment=aug, **kw)
        s.set_epoch(e)
        return list(s)

    a, again, other_epoch, other_seed = epoch(0, 1), epoch(0, 1), epoch(0, 2), epoch(1, 1)
    order = torch.cat([i for i, _ in a])
    assert sorted(order.tolist()) == list(range(1000)) and [len(i) for i, _ in a] == [64] * 15 + [40]
    assert all(torch.equal(i, j) and torch.equal(p, q) for (i, p), (j, q) in zip(a, again))
    assert not torch.equal(order, torch.cat([i for i, _ in other_epoch]))
    assert not torch.equal(order, torch.cat([i for i, _ in other_seed]))
    # The same order as the torchvision pipeline's sampler on one process (randperm seeded with seed + epoch).
    assert torch.equal(order, torch.randperm(1000, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("n", [1000, 961])  # 961: a last global batch of 1 image, topped up for the 2nd rank
def test_ranks_take_their_share_of_each_global_batch_and_cover_the_epoch(n):
    aug = BatchAugment(CIFAR10_MEAN, CIFAR10_STD)
    single = list(EpochBatches(n, 64, shuffle=True, augment=aug))
    ranks = [list(EpochBatches(n, 64, shuffle=True, augment=aug, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)  # the same number of steps on every rank
    for b, (index, params) in enumerate(single):
        together = torch.cat([ranks[0][b][0], ranks[1][b][0]])
        if len(index) >= 2:  # every global batch is the one-process batch, split in two
            assert torch.equal(together, index) and torch.equal(torch.cat([ranks[0][b][1], ranks[1][b][1]], 1),
                                                                params)
        else:
            assert together[0] == index[0] and len(ranks[1][b][0]) == 1
    seen = torch.cat([i for r in ranks for i, _ in r])
    assert set(seen.tolist()) == set(range(n))


def test_evaluation_shards_cover_every_image_once_with_equal_batch_counts():
    for n, world, batch in [(10_000, 1, 128), (10_000, 3, 129), (7, 2, 4), (1001, 4, 8)]:
        shards = [list(EpochBatches(n, batch, shuffle=False, rank=r, world_size=world)) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        assert all(0 < len(i) <= batch // world and p is None for s in shards for i, p in s)
        assert torch.equal(torch.cat([i for s in shards for i, _ in s]), torch.arange(n))


def test_a_set_that_does_not_fit_the_device_stays_in_host_memory():
    gpu = torch.device("cuda", 0)
    assert place(150 * 2**20, gpu, 80 * 2**30) == (gpu, None)
    where, message = place(300 * 2**20, gpu, 400 * 2**20)
    assert where == torch.device("cpu") and "host memory" in message and "\n" not in message
    assert place(10**12, torch.device("cpu"), None) == (torch.device("cpu"), None)


def test_a_host_set_is_cropped_before_the_transfer(tmp_path):
    write_cifar(tmp_path, hundred=False, n_train=10)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=10, verify_md5=False)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    before = dm.on_before_batch_transfer(batch, 0)  # the set is in host memory: cropped here, uint8
    assert before["pixels"].dtype == torch.uint8 and before["pixels"].shape == (10, 3, 32, 32)
    x, y = dm.on_after_batch_transfer(before, 0)
    ref, ref_y = dm.materialise(batch)
    assert torch.equal(x, ref) and torch.equal(y, ref_y)


def test_mirror_set_holds_the_flipped_images():
    images = torch.randint(0, 256, (5, 3, 4, 6), dtype=torch.uint8)
    s = ImageSet(images, torch.arange(5), mirror=True)
    assert len(s) == 5 and torch.equal(s.pixels[5:], images.flip(-1)) and torch.equal(s.pixels[:5], images)


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_batched_is_the_default_and_torchvision_stays_selectable(tmp_path, hundred):
    files = write_cifar(tmp_path, hundred)
    cls = CIFAR100DataModule if hundred else CIFAR10DataModule
    dm = cls(root=str(tmp_path), batch_size=4, verify_md5=False, augment=False)
    tv = cls(root=str(tmp_path), batch_size=4, verify_md5=False, augment=False, pipeline="torchvision",
             num_workers=0)
    assert dm.pipeline == "batched"
    for d in (dm, tv):
        d.setup("fit")
    # Evaluation batches in order: the same tensors from both pipelines.
    for loader in ("val_dataloader", "test_dataloader"):
        xs = torch.cat([dm.materialise(b)[0] for b in getattr(dm, loader)()])
        xt = torch.cat([b[0] for b in getattr(tv, loader)()])
        assert torch.equal(xs, xt) and len(xs) == 6
    label_key = "fine_labels" if hundred else "labels"
    ys = torch.cat([dm.materialise(b)[1] for b in dm.test_dataloader()])
    assert ys.tolist() == files["test" if hundred else "test_batch"][label_key]
    with pytest.raises(ValueError, match="pipeline"):
        cls(pipeline="dali")


class RecordingCIFAR10(CIFAR10DataModule):
    """Saves, per process, the image indices of every training batch it hands to the network."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self._is_batched(batch) and batch["split"] == "train":
            out = Path(os.environ["RECORD_DIR"]) / f"rank{self.trainer.global_rank}.txt"
            with open(out, "a") as f:
                f.write(" ".join(map(str, batch["index"].tolist())) + "\n")
        return super().on_after_batch_transfer(batch, dataloader_idx)


@pytest.mark.slow
def test_ddp_two_gloo_processes_split_each_global_batch_and_cover_the_epoch_once(tmp_path):
    write_cifar(tmp_path, hundred=False, n_train=48)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
seed_everything: 3
model:
  model: lenet5
  optimizer: {{class_path: torch.optim.SGD, init_args: {{lr: 0.01}}}}
data:
  class_path: tests.test_data_cifar_batched.RecordingCIFAR10
  init_args: {{root: {tmp_path}, batch_size: 16, verify_md5: false}}
trainer:
  max_epochs: 2
  accelerator: cpu
  strategy: ddp
  devices: 2
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  limit_val_batches: 1
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "WANDB_MODE": "disabled", "RECORD_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "lightcnn.fit", str(recipe), "--run_root", str(tmp_path / "runs"),
           "--test_after_fit", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [[list(map(int, line.split())) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
             for r in (0, 1)]
    assert [len(r) for r in ranks] == [6, 6]  # 3 global batches of 16 per epoch, 8 images per process
    single = EpochBatches(48, 16, shuffle=True, seed=3, augment=BatchAugment(CIFAR10_MEAN, CIFAR10_STD))
    for epoch in (0, 1):
        single.set_epoch(epoch)
        for b, (index, _) in enumerate(single):
            step = epoch * 3 + b
            assert ranks[0][step] + ranks[1][step] == index.tolist()  # the one-process global batch, halved
        seen = [i for r in ranks for batch in r[epoch * 3:(epoch + 1) * 3] for i in batch]
        assert sorted(seen) == list(range(48))


@pytest.mark.parametrize("knob", [{"auto_augment": "trivialaugment"}, {"random_erasing": 0.25}])
def test_per_image_policies_run_on_the_torchvision_pipeline(knob):
    # RandAugment & co. and Random Erasing are per-image torchvision transforms: the data module says so and
    # builds them on the torchvision pipeline rather than silently dropping them from the batched one.
    dm = CIFAR10DataModule(batch_size=4, verify_md5=False, num_workers=0, **knob)
    assert dm.pipeline == "torchvision"
    assert CIFAR10DataModule(batch_size=4, verify_md5=False).pipeline == "batched"
