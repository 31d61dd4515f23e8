"""The base of every lightcnn datamodule: a *global* batch size split over the processes, loaders, and
the input size and normalisation taken from the model where the recipe leaves them out.

`batch_size` in every config is the global batch size (the papers' number: all GPUs and nodes
together). Each process loads `batch_size // world_size` samples; a batch size that does not divide by
the world size is an error, so that a recipe never silently trains with another batch size.

Input size and normalisation (timm's `resolve_data_config`): a data module's `image_size`, `mean` and
`std` default to None, meaning "as the network expects": at `setup` they are read from the
`default_cfg` of the network being trained (`input_size` (C, H, W), `mean`, `std`), which the data
module reaches through its trainer; without a network (a data module used alone) the data set's own
values apply. A value the recipe sets always wins. `eval_config()` tells what evaluation resolved to (size,
normalisation), which the training module saves in its checkpoints for `lightcnn.predict`.

`num_workers` never exceeds the CPUs this process may use (`os.sched_getaffinity`), so a recipe written
for a large machine does not oversubscribe a small one.

`augment_ops` and `erasing_ops` build the modern augmentations that the CIFAR and folder data modules
offer as knobs (`auto_augment`, `random_erasing`), all from torchvision.transforms.v2.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Iterator, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

AutoAugment = Literal["none", "randaugment", "trivialaugment", "autoaugment"]


def augment_ops(auto_augment: AutoAugment, dataset: Literal["cifar10", "imagenet"] = "imagenet") -> list[v2.Transform]:
    """The automatic augmentation policy named by `auto_augment`, for images before normalisation:
    RandAugment (Cubuk et al. 2020, torchvision's N=2, M=9), TrivialAugmentWide (Mueller & Hutter 2021),
    AutoAugment (Cubuk et al. 2019, with the CIFAR-10 or ImageNet policy); "none": no op."""
    if auto_augment == "none":
        return []
    if auto_augment == "randaugment":
        return [v2.RandAugment()]
    if auto_augment == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if auto_augment == "autoaugment":
        policy = v2.AutoAugmentPolicy.CIFAR10 if dataset == "cifar10" else v2.AutoAugmentPolicy.IMAGENET
        return [v2.AutoAugment(policy)]
    raise ValueError(f"auto_augment must be 'none', 'randaugment', 'trivialaugment' or 'autoaugment', "
                     f"got {auto_augment!r}")


def erasing_ops(probability: float) -> list[v2.Transform]:
    """Random Erasing (Zhong et al. 2020) of a normalised image with `probability` (0: none); the erased
    rectangle holds zeros, i.e. the data set's mean colour."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"random_erasing is a probability in [0, 1], got {probability}")
    return [v2.RandomErasing(p=probability)] if probability else []


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class EpochSeededRandomSampler(DistributedSampler):
    """A shuffled order that depends only on (seed, epoch), not on the global RNG; this process's share of
    it under DDP; and resumable in the middle of an epoch.

    Lightning calls `set_epoch` at the start of every epoch, so a run resumed from a checkpoint sees the
    same sample order as an uninterrupted one. On one process the order is `torch.randperm(n)` seeded with
    `seed + epoch` (that of a `RandomSampler` with such a generator); with `num_replicas` processes each
    takes every `num_replicas`-th index of it, as Lightning's own `DistributedSampler` would (being one,
    it is kept by Lightning instead of replaced). `start` skips the first indices of the next pass only:
    `ResumableDataLoader` sets it to resume mid-epoch.
    """

    def __init__(self, data_source: Dataset, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return itertools.islice(super().__iter__(), start, None)


class EpochPosition:
    """Where a training loader is in its epoch, as checkpoints save it: the epoch and how many of its batches
    were handed out (Lightning saves the state of a training loader that has `state_dict`/`load_state_dict`).
    After `load_state_dict`, the next pass over that epoch starts after those batches (`_begin` says how many
    to skip); a pass over another epoch starts at its first. Subclasses call `_reset_position()` in
    `__init__`, start each pass with `_begin(epoch)`, count what they yield with `_count(...)`, and set
    their epoch in `_restore_epoch`."""

    def _reset_position(self) -> None:
        self.epoch, self.handed_out = 0, 0
        self._resume: dict[str, int] | None = None

    def _begin(self, epoch: int) -> int:
        resume, self._resume = self._resume, None
        skip = resume["handed_out"] if resume is not None and resume["epoch"] == epoch else 0
        self.epoch, self.handed_out = epoch, skip
        return skip

    def _count(self, batches: Iterable[Any]) -> Iterator[Any]:
        for batch in batches:
            self.handed_out += 1
            yield batch

    def _restore_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "handed_out": self.handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)
        self._restore_epoch(state["epoch"])


class ResumableDataLoader(EpochPosition, DataLoader):
    """A `DataLoader` whose position in the epoch is saved in checkpoints (`EpochPosition`), so that a
    checkpoint saved in the middle of an epoch resumes with the next batch: the next pass over that epoch
    skips the handed-out batches' indices in the sampler (nothing is loaded twice). Iteration starts lazily,
    after Lightning's `set_epoch`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._reset_position()

    def __iter__(self) -> Iterator[Any]:
        skip = self._begin(getattr(self.sampler, "epoch", 0))
        if skip and hasattr(self.sampler, "start"):
            self.sampler.start = skip * (self.batch_size or 1)
        yield from self._count(super().__iter__())

    def _restore_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class UnreadableDataError(FileNotFoundError):
    """A data file that is there but cannot be read (truncated or corrupt). A `FileNotFoundError`, so that the
    command line reports it in one line as it does a missing file: the remedy is the same, get it again."""


class ClassificationDataModule(L.LightningDataModule):
    """Shared loader logic. Subclasses set `num_classes`, `in_chans` and the three datasets in `setup`.

    Args:
        batch_size: the global batch size (all processes together); each process loads
            `batch_size // world_size`.
        num_workers: loader worker processes per training process.
        pin_memory: pin host memory (only takes effect when CUDA is available).
    """

    num_classes: int
    in_chans: int

    def __init__(self, batch_size: int, num_workers: int = 0, pin_memory: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        cpus = usable_cpus()
        if num_workers > cpus:
            rank_zero_info(f"lightcnn: num_workers {num_workers} -> {cpus}, the CPUs this process may use")
            num_workers = cpus
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def world_size(self) -> int:
        trainer = self.trainer
        return trainer.world_size if trainer is not None else 1

    @property
    def batch_size_per_device(self) -> int:
        world = self.world_size
        if self.batch_size % world:
            lower = self.batch_size // world * world
            raise ValueError(
                f"batch_size={self.batch_size} is the global batch size and must divide by the world size "
                f"{world} (devices x nodes). Use a multiple of {world}, e.g. --data.batch_size "
                f"{lower or world} or {lower + world}, or change --trainer.devices/--trainer.num_nodes."
            )
        return self.batch_size // world

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device  # fail at setup, before any data is read, if the batch does not divide

    def model_default_cfg(self) -> dict[str, Any]:
        """The `default_cfg` of the network this data feeds (via the trainer's LightningModule), or {}."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        net = getattr(module, "net", module)
        return dict(getattr(net, "default_cfg", None) or {})

    def resolve_data_config(self, fallback: dict[str, Any], **recipe: Any) -> dict[str, Any]:
        """For each key of `fallback` (`image_size`, `mean`, `std`, `crop_pct`): the recipe's value if it is
        not None, else the network's `default_cfg` value, else `fallback`'s. Checks that mean/std have
        one value per channel of this data."""
        model = self.model_default_cfg()
        if "input_size" in model:
            _, h, w = model["input_size"]
            if h == w:
                model["image_size"] = h
            elif "image_size" in fallback and recipe.get("image_size") is None:
                raise ValueError(f"the network expects {h}x{w} inputs but {type(self).__name__} makes square "
                                 f"images: set image_size in the recipe (--data.init_args.image_size)")
        out = {}
        for key, default in fallback.items():
            for value in (recipe.get(key), model.get(key), default):
                if value is not None:
                    break
            out[key] = value
        self._resolved = dict(out)
        for key in ("mean", "std"):
            if key in out and len(out[key]) != self.in_chans:
                raise ValueError(f"{key}={tuple(out[key])} has {len(out[key])} values but the data has {self.in_chans} "
                                 f"channel(s): give one per channel (--data.init_args.{key})")
        return out

    def eval_config(self) -> dict[str, Any]:
        """How evaluation images are fed: `in_chans`, `image_size` (an int or (H, W)), `mean`/`std` when
        resolved, and for folder data `resize_size`. Read after `setup`."""
        cfg: dict[str, Any] = {"in_chans": self.in_chans}
        resolved = getattr(self, "_resolved", {})
        for key in ("image_size", "mean", "std", "resize_size"):
            if resolved.get(key) is not None:
                value = resolved[key]
                cfg[key] = list(value) if isinstance(value, (tuple, list)) else value
        if "image_size" not in cfg:  # the size of a real evaluation sample
            dataset = self.test_set if self.test_set is not None else self.val_set
            if dataset is not None and len(dataset):
                h, w = dataset[0][0].shape[-2:]
                cfg["image_size"] = int(h) if h == w else [int(h), int(w)]
        return cfg

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        if train:
            trainer = self.trainer
            sampler = EpochSeededRandomSampler(dataset, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
                                               num_replicas=self.world_size, rank=getattr(trainer, "global_rank", 0))
        else:
            sampler = None
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size_per_device,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
