"""The base of every lightcnn datamodule: a *global* batch size split over the processes, loaders, and
the input size and normalisation taken from the model where the recipe leaves them out.

`batch_size` in every config is the global batch size (the papers' number: all GPUs and nodes
together). Each process loads `batch_size // world_size` samples; a batch size that does not divide by
the world size is an error, so that a recipe never silently trains with another batch size.

Input size and normalisation (timm's `resolve_data_config`): a data module's `image_size`, `mean` and
`std` default to None, meaning "as the network expects": at `setup` they are read from the
`default_cfg` of the network being trained (`input_size` (C, H, W), `mean`, `std`), which the data
module reaches through its trainer; without a network (a data module used alone) the data set's own
values apply. A value the recipe sets always wins.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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


class ResumableDataLoader(DataLoader):
    """A `DataLoader` whose position in the epoch is saved in checkpoints (Lightning saves the state of a
    training loader that has `state_dict`/`load_state_dict`), so that a checkpoint saved in the middle of
    an epoch resumes with the next batch: its state is the epoch and the batches handed out in it, and
    the next pass over that epoch skips those batches' indices in the sampler (nothing is loaded twice).
    Iteration starts lazily, after Lightning's `set_epoch`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.epoch, self.handed_out = 0, 0
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", 0)
        resume, self._resume = self._resume, None
        skip = resume["handed_out"] if resume is not None and resume["epoch"] == epoch else 0
        if skip and hasattr(self.sampler, "start"):
            self.sampler.start = skip * (self.batch_size or 1)
        self.epoch, self.handed_out = epoch, skip
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "handed_out": self.handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(state["epoch"])


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
        for key in ("mean", "std"):
            if key in out and len(out[key]) != self.in_chans:
                raise ValueError(f"{key}={tuple(out[key])} has {len(out[key])} values but the data has {self.in_chans} "
                                 f"channel(s): give one per channel (--data.init_args.{key})")
        return out

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
