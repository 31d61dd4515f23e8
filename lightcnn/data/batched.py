"""A small image data set held as one uint8 tensor on the training device and augmented a batch at a time
there (the design of airbench and hlb-CIFAR10): the batched CIFAR pipeline, `--data.pipeline batched`.

What a batch goes through, and where:
1. The loader (`BatchedLoader`, in the training process, no workers) yields only which images a batch
   holds and their augmentation parameters: a few hundred integers. The order and the parameters of an
   epoch come from (seed, epoch) alone (`EpochBatches`), so a resumed run, a DDP run and an
   uninterrupted one see the same images with the same crops; the loader saves how many batches of the
   epoch it has handed out, so a checkpoint saved mid-epoch resumes at the next batch.
2. `crop_flip` gathers the batch from the set where the set lives (the GPU, or host memory when the set
   does not fit there): a pad-4 random crop and a horizontal flip, on uint8 pixels. Flipped images come
   from a mirrored copy of the set, and each crop row is one contiguous slice of the padded batch, so
   the whole step is three copies (no per-pixel index arithmetic).
3. `normalise` turns the uint8 crop into the network's input on the training device: torchvision's
   `ToDtype(float32, scale=True)` and `Normalize` (the same operations, so the same bits), the "mean"
   padding and Cutout as zeros after normalisation, then the dtype and memory format of the network.

Given the same crop offsets, flips and Cutout centres, a batch equals torchvision v2's per-image output
(`lightcnn.data.cifar.cifar_transforms`) exactly; the tests check it for each padding mode.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F

from lightcnn.data.base import EpochPosition

PaddingMode = Literal["zero", "mean", "reflect"]

# Rows of the augmentation parameters of a batch (one column per image).
DY, DX, FLIP, CY, CX = range(5)


class ImageSet:
    """Images as one uint8 tensor (N, C, H, W) with int64 labels (N,), plus, when `mirror`, the horizontally
    flipped copy of every image (rows N..2N-1 of `pixels`), from which flipped crops are taken."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mirror: bool = False):
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"need uint8 images (N, C, H, W) and N labels, got {tuple(images.shape)} "
                             f"{images.dtype} and {tuple(labels.shape)}")
        self.num_images = len(images)
        self.pixels = torch.cat([images, images.flip(-1)]) if mirror else images.contiguous()
        self.labels = labels.to(torch.int64)
        self.mirror = mirror

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() * self.pixels.element_size() + self.labels.numel() * 8

    def to(self, device: torch.device | str) -> ImageSet:
        self.pixels, self.labels = self.pixels.to(device), self.labels.to(device)
        return self

    def __len__(self) -> int:
        return self.num_images


def place(nbytes: int, device: torch.device, free_bytes: int | None) -> tuple[torch.device, str | None]:
    """Where a set of `nbytes` lives: on `device` when it takes at most half of its free memory (the network
    needs the rest), else in host memory, with the one-line message that says so."""
    if device.type == "cpu" or free_bytes is None or nbytes <= free_bytes // 2:
        return device, None
    return torch.device("cpu"), (
        f"lightcnn: the data set ({nbytes / 2**20:.0f} MiB with its mirror image) does not fit in half of the "
        f"free memory of {device} ({free_bytes / 2**20:.0f} MiB): it stays in host memory and each batch is "
        f"cropped there, then copied and normalised on {device}")


def free_memory(device: torch.device) -> int | None:
    """Free bytes of a CUDA device, None for other devices."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class BatchAugment:
    """The papers' CIFAR augmentation as numbers per image: a crop offset (dy, dx) uniform over
    0..2*padding each, a flip with probability 0.5, and a Cutout centre (cy, cx) uniform over the pixels.

    Args:
        mean, std: per-channel normalisation, as torchvision's `Normalize`.
        augment: draw crops and flips (training); False: only normalise.
        padding: pixels of padding on each side before the random crop.
        padding_mode: what the padding holds: "zero" (black), "mean" (zeros after normalisation, i.e.
            the mean colour) or "reflect" (a mirror image of the border, without repeating the edge).
        cutout: side of the Cutout square (0: none), zeroed after normalisation.
    """

    def __init__(self, mean, std, augment: bool = True, padding: int = 4, padding_mode: PaddingMode = "zero",
                 cutout: int = 0):
        if padding_mode not in ("zero", "mean", "reflect"):
            raise ValueError(f"padding_mode must be 'zero', 'mean' or 'reflect', got {padding_mode!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.padding, self.padding_mode, self.cutout = augment, padding, padding_mode, cutout

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Parameters of n images, (5, n) int64: rows DY, DX, FLIP, CY, CX."""
        offsets = torch.randint(0, 2 * self.padding + 1, (2, n), generator=generator)
        flips = torch.randint(0, 2, (1, n), generator=generator)
        centres = torch.stack([torch.randint(0, height, (n,), generator=generator),
                               torch.randint(0, width, (n,), generator=generator)])
        return torch.cat([offsets, flips, centres])

    def crop_flip(self, images: ImageSet, index: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        """The uint8 batch (B, C, H, W) of images `index`, cropped and flipped as `params` say (on the set's
        device). Without `params`, the images as they are."""
        index = index.to(images.device)
        if params is None or not self.augment:
            return images.pixels.index_select(0, index)
        params = params.to(images.device)
        flip = params[FLIP]
        if not images.mirror:
            raise ValueError("crops with flips need an ImageSet built with mirror=True")
        batch = images.pixels.index_select(0, index + flip * images.num_images)  # flipped ones from the mirror
        p = self.padding
        # A flipped image's crop at column dx is the crop of the flipped padded image at 2p - dx.
        dy, dx = params[DY], torch.where(flip.bool(), 2 * p - params[DX], params[DX])
        mode = "reflect" if self.padding_mode == "reflect" else "constant"  # constant: black, see `normalise`
        padded = F.pad(batch, (p, p, p, p), mode=mode).contiguous()
        b, c, hp, wp = padded.shape
        h, w = hp - 2 * p, wp - 2 * p
        # Row i of channel k of image j is padded[j, k, dy_j + i, dx_j : dx_j + w]: one contiguous run of w
        # pixels, taken with index_select from a view whose rows start at every pixel.
        starts = (torch.arange(b * c, device=padded.device) * (hp * wp)).view(b, c, 1)
        starts = starts + ((dy.view(b, 1) + torch.arange(h, device=padded.device)) * wp + dx.view(b, 1)).view(b, 1, h)
        flat = padded.view(-1)
        runs = flat.as_strided((flat.numel() - w + 1, w), (1, 1))
        return runs.index_select(0, starts.view(-1)).view(b, c, h, w)

    def normalise(self, batch: torch.Tensor, params: torch.Tensor | None, dtype: torch.dtype = torch.float32,
                  channels_last: bool = False) -> torch.Tensor:
        """The network's input from a uint8 batch: torchvision's scaling and normalisation (the same
        operations, so the same values), then the "mean" padding and Cutout as zeros, in `dtype` and, with
        `channels_last`, that memory format."""
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)  # the float ops below keep it
        x = batch.to(torch.float32).mul_(1.0 / 255)  # torchvision's to_dtype_image(scale=True)
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        x = x.sub_(mean).div_(std)  # torchvision's normalize_image
        if params is not None and self.augment and (self.padding_mode == "mean" or self.cutout):
            x = x.mul_(self._keep(params.to(x.device), x.shape[-2], x.shape[-1]))
        return x if dtype == torch.float32 else x.to(dtype)

    def _keep(self, params: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, 1, H, W) float: 0 on the "mean" padding and the Cutout square, 1 elsewhere."""
        rows, cols = torch.arange(h, device=params.device), torch.arange(w, device=params.device)
        keep = None
        if self.augment and self.padding_mode == "mean":
            p, flip = self.padding, params[FLIP].bool()
            dx = torch.where(flip, 2 * p - params[DX], params[DX])
            r, c = params[DY, :, None] + rows - p, dx[:, None] + cols - p
            keep = ((r >= 0) & (r < h))[:, :, None] & ((c >= 0) & (c < w))[:, None, :]
        if self.cutout:
            half = self.cutout // 2
            top, left = params[CY, :, None] - half, params[CX, :, None] - half
            in_rows = (rows >= top) & (rows < top + self.cutout)
            in_cols = (cols >= left) & (cols < left + self.cutout)
            outside = ~(in_rows[:, :, None] & in_cols[:, None, :])
            keep = outside if keep is None else keep & outside
        return keep[:, None].to(torch.float32)


class EpochBatches(EpochPosition):
    """Which images each batch of an epoch holds on this process, and their augmentation parameters.

    Training (`shuffle`): the epoch's permutation and every image's parameters are drawn from a generator
    seeded with `seed + epoch` (the order of `EpochSeededRandomSampler` on one process), so they depend on
    nothing else. Global batch b holds permuted positions [b * batch_size, (b + 1) * batch_size); rank r
    takes its `batch_size // world_size` consecutive share, so all ranks together see every image once
    per epoch and the global batch is the one of a single process. A last batch smaller than the world
    size (rare) is topped up from the start of the epoch so that no rank gets an empty batch.

    Evaluation: the images in order, split into `world_size` contiguous shards (every image once), each
    cut into the same number of batches of at most `batch_size // world_size`.

    Lightning calls `set_epoch` before each epoch; `state_dict` (`EpochPosition`) holds the epoch and how many
    batches of it were handed out, and `load_state_dict` makes the next pass over that epoch start after them.
    """

    def __init__(self, num_images: int, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, augment: BatchAugment | None = None, image_size: tuple[int, int] = (32, 32)):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must divide by the world size {world_size}")
        if num_images < world_size:
            raise ValueError(f"{num_images} images cannot be shared by {world_size} processes")
        self.num_images, self.batch_size, self.shuffle, self.seed = num_images, batch_size, shuffle, seed
        self.rank, self.world_size, self.augment, self.image_size = rank, world_size, augment, image_size
        self.per_rank = batch_size // world_size
        self._reset_position()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:
            return math.ceil(self.num_images / self.batch_size)
        return math.ceil(math.ceil(self.num_images / self.world_size) / self.per_rank)

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """This rank's batches of the current epoch: (image indices, parameters (5, B) or None)."""
        n, world = self.num_images, self.world_size
        if not self.shuffle:
            shard = torch.tensor_split(torch.arange(n), world)[self.rank]
            return [(part, None) for part in torch.tensor_split(shard, len(self))]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator)
        params = self.augment.draw(n, *self.image_size, generator) if self.augment is not None else None
        out = []
        for start in range(0, n, self.batch_size):
            positions = torch.arange(start, min(start + self.batch_size, n))
            if len(positions) < world:  # top up a tiny last batch so that every rank gets an image
                positions = torch.cat([positions, torch.arange(world - len(positions))])
            mine = (positions[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
                    if len(positions) == self.batch_size else torch.tensor_split(positions, world)[self.rank])
            out.append((order[mine], None if params is None else params[:, mine]))
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        # A generator: nothing is drawn before the first batch is asked for, i.e. after Lightning's set_epoch.
        start = self._begin(self.epoch)
        yield from self._count(self.batches()[start:])

    def _restore_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class BatchedLoader:
    """The loader Lightning iterates for one split of a batched data set: yields, per batch, a dict with the
    split's name, the image indices and the augmentation parameters. The datamodule's batch-transfer hooks
    turn it into (images, labels) on the training device. Stateful (Lightning saves and restores the
    training loader's state in checkpoints), so a mid-epoch resume continues with the next batch."""

    batch_sampler = None  # what Lightning's loader checks look for on a DataLoader

    def __init__(self, split: str, sampler: EpochBatches):
        self.split, self.sampler = split, sampler  # `sampler`: Lightning calls its set_epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, params in self.sampler:
            yield {"split": self.split, "index": index} if params is None else {
                "split": self.split, "index": index, "params": params}

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
