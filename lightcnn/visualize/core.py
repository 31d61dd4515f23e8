"""Models, checkpoints, images and layers for the insight tools: what every picture starts from.

- `load_model(name, checkpoint)` (`lightcnn.models.load_model`): a registered network in eval mode, with the
  weights of a `lightcnn.fit` checkpoint, of a snapshot of `FeatureSnapshots`, or of a plain state_dict.
- `load_images(sources, cfg)`: image files (or `sklearn:china.jpg`, `sklearn:flower.jpg`, `digits:N`) as
  a normalised batch at the model's input size.
- `trace_chain(model, x)`: the modules the forward pass runs, in order, with each one's input and output,
  and how far they form a plain chain (each module reading the previous one's output), which is what
  the deconvnet and the receptive-field arithmetic need.
- `receptive_fields(chain, input_hw)`: the receptive field (size, stride and offset in input pixels) of a
  unit of every layer of the chain.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.layers import LocalResponseNorm
from lightcnn.models.lenet import ScaledTanh, SparseConv2d, Subsampling
from lightcnn.models.loading import check_finite, load_model  # noqa: F401  (part of this module's API)
from lightcnn.visualize.names import from_paper_name, paper_names

# Pointwise non-linearities: the deconvnet rectifies its reconstruction where the forward pass had one
# of these (Zeiler & Fergus, Sec. 2.1 for ReLU; we treat tanh, sigmoid etc. the same way).
RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh,
              ScaledTanh)
# Passed through unchanged by the deconvnet: contrast normalisation (the paper ignores it in the
# backward projection) and what is the identity in eval mode.
PASS_THROUGH = (nn.LocalResponseNorm, LocalResponseNorm, nn.Dropout, nn.Dropout2d, nn.Identity)
# Modules with children that act as one layer (a unit of the chain).
ATOMIC = (SparseConv2d, nn.LocalResponseNorm)
SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")


# --- models and checkpoints -------------------------------------------------------------------------------


# --- images -------------------------------------------------------------------------------------------------


def input_hw(model: nn.Module, input_size: int | None = None) -> tuple[int, int]:
    if input_size is not None:
        return (input_size, input_size)
    return tuple(model.default_cfg["input_size"][1:])


def normalize(img: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] -> the model's normalised input."""
    mean = torch.tensor(model.default_cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(model.default_cfg["std"]).view(1, -1, 1, 1)
    return (img - mean) / std


def denormalize(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    mean = torch.tensor(model.default_cfg["mean"], device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(model.default_cfg["std"], device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def _fit(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize the shorter side to fit and centre-crop to `hw` (C, H, W in [0, 1])."""
    scale = max(hw[0] / img.shape[1], hw[1] / img.shape[2])
    size = (max(hw[0], round(img.shape[1] * scale)), max(hw[1], round(img.shape[2] * scale)))
    img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (size[0] - hw[0]) // 2, (size[1] - hw[1]) // 2
    return img[:, top:top + hw[0], left:left + hw[1]].clamp(0, 1)


def _source(src: str) -> tuple[torch.Tensor, int | None]:
    """One image in [0, 1] as (C, H, W), and its label when the source knows it."""
    if src.startswith("sklearn:"):
        from sklearn.datasets import load_sample_images

        name = src.split(":", 1)[1]
        if name not in SAMPLE_PHOTOS:
            raise ValueError(f"unknown sample image {src!r}; scikit-learn ships "
                             f"{', '.join('sklearn:' + n for n in SAMPLE_PHOTOS)}")
        photo = load_sample_images().images[SAMPLE_PHOTOS.index(name)]
        return torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255, None
    if src.startswith("digits:"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        i = int(src.split(":", 1)[1])
        if not 0 <= i < len(digits.target):
            raise ValueError(f"{src!r}: scikit-learn's digits are numbered 0..{len(digits.target) - 1}")
        # the 8x8 digit resized to 24x24 and centred in 32x32, as lightcnn.data.DigitsDataModule does
        d = torch.as_tensor(digits.images[i], dtype=torch.float32)[None, None] / 16
        d = F.interpolate(d, size=(24, 24), mode="bilinear", align_corners=False).clamp(0, 1)
        return F.pad(d, (4, 4, 4, 4))[0], int(digits.target[i])
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"image {src!r} does not exist (give image files, 'sklearn:china.jpg', "
                                f"'sklearn:flower.jpg' or 'digits:N')")
    from PIL import Image

    with Image.open(path) as im:
        arr = torch.as_tensor(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        return arr.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255, None


def load_images(sources: Sequence[str], model: nn.Module, input_size: int | None = None
                ) -> tuple[torch.Tensor, list[int | None]]:
    """The images as the model's normalised input batch (N, C, H, W), and their labels where known."""
    if not sources:
        raise ValueError("give at least one image")
    hw, chans = input_hw(model, input_size), model.default_cfg["input_size"][0]
    batch, labels = [], []
    for src in sources:
        img, label = _source(str(src))
        if img.shape[0] != chans:  # grey <-> RGB
            img = img.mean(0, keepdim=True).expand(chans, -1, -1) if chans in (1, 3) else img.mean(0, keepdim=True)
            if img.shape[0] != chans:
                raise ValueError(f"the model takes {chans}-channel input; images have 1 or 3 channels")
        batch.append(_fit(img, hw))
        labels.append(label)
    return normalize(torch.stack(batch), model), labels


# --- layers ---------------------------------------------------------------------------------------------


def resolve_layer(model: nn.Module, name: str, valid: Sequence[str] | None = None) -> str:
    """The module name of `name`: an exact name of `model.named_modules()`, a unique dotted suffix of one
    (`conv5` for `features.conv5`) or the paper's name of a layer (`C3` for LeNet-5's `features.4`, see
    `lightcnn.visualize.names`). Unknown or ambiguous names are a ValueError listing the valid ones."""
    valid = list(valid) if valid is not None else [n for n, _ in model.named_modules() if n]
    if name in valid:
        return name
    matches = [v for v in valid if v.endswith("." + name)]
    if len(matches) == 1:
        return matches[0]
    paper = from_paper_name(model, name)  # "C3" for LeNet-5's features.4
    if not matches and paper in valid:
        return paper
    what = f"ambiguous layer {name!r} (matches {', '.join(matches)})" if matches else f"unknown layer {name!r}"
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f" Closest: {', '.join(close)}." if close and not matches else ""
    papers = [f"{p} = {m}" for m, p in paper_names(model).items() if m in valid]
    named = f" The paper's names: {'; '.join(papers)}." if papers else ""
    raise ValueError(f"{what} for {type(model).__name__}.{hint} Valid layers: {', '.join(valid)}.{named}")


@dataclass
class Unit:
    """One module of the forward pass: its name, the module, and (copies of) its input and output."""

    name: str
    module: nn.Module
    input: torch.Tensor
    output: torch.Tensor
    chained: bool = True  # its input is the previous unit's output (or the image, for the first)


@dataclass
class Chain:
    units: list[Unit]
    logits: torch.Tensor
    broken_at: str | None = None  # the first unit whose input is not the previous unit's output
    index: dict = field(default_factory=dict)
    reused: set = field(default_factory=set)

    def __post_init__(self):
        self.index = {}
        for i, u in enumerate(self.units):  # a module run twice (a reused ReLU) keeps its first place
            self.index.setdefault(u.name, i)
        self.reused = {u.name for i, u in enumerate(self.units) if self.index[u.name] != i}

    @property
    def chained(self) -> list[Unit]:
        """The units up to the first break: the part the deconvnet and the RF arithmetic can handle."""
        out = []
        for u in self.units:
            if not u.chained:
                break
            out.append(u)
        return out

    def spatial_names(self) -> list[str]:
        """Names of the chained units with a spatial (N, C, H, W) output."""
        return [u.name for u in self.chained if u.output.dim() == 4 and u.name not in self.reused]


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out, skip = [], ()
    for name, m in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(m, ATOMIC):
            out.append((name, m))
            skip = name + "."
        elif not any(True for _ in m.children()):
            out.append((name, m))
    return out


@torch.no_grad()
def trace_chain(model: nn.Module, x: torch.Tensor) -> Chain:
    """Run `model` on `x` (eval mode) recording every leaf module's input and output in the order run.

    A unit is `chained` when its input is the very tensor the unit before it returned (the image, for the
    first): true of conv/ReLU/pool networks (LeNet-5, AlexNet, ZFNet, VGG), false from the first layer
    whose input is computed outside the modules (a residual sum, a concatenation)."""
    model.eval()
    records: list[Unit] = []
    last = [x]  # the tensor object the previous unit returned

    def pre(name):
        def hook(m, args):
            inp = args[0]
            records.append(Unit(name, m, inp.detach().clone(), inp, chained=inp is last[0]))
        return hook

    def post(m, args, out):
        records[-1].output = out.detach().clone()  # a copy: the next (in-place) ReLU must not change it
        last[0] = out

    handles = []
    for name, m in _units(model):
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    broken = next((u.name for u in records if not u.chained), None)
    chained = True
    for u in records:  # once broken, nothing after counts as chained
        chained = chained and u.chained
        u.chained = chained
    return Chain(records, logits, broken)


def require_chain_layer(model: nn.Module, chain: Chain, name: str) -> str:
    """Resolve `name` among the chained spatial units; a clear error for any other layer."""
    valid = chain.spatial_names()
    try:
        return resolve_layer(model, name, valid)
    except ValueError:
        all_names = [n for n, _ in model.named_modules() if n]
        if name in all_names or any(n.endswith("." + name) for n in all_names):
            why = (f"the network is no plain conv/ReLU/pool chain from {chain.broken_at!r} on"
                   if chain.broken_at else "it has no spatial output inside the conv/pool chain")
            raise ValueError(f"layer {name!r} cannot be projected by the deconvnet ({why}). "
                             f"Valid layers: {', '.join(valid)}") from None
        raise


# --- receptive fields -----------------------------------------------------------------------------------


@dataclass
class Field:
    """The receptive field of one unit of a layer, per axis (H, W): unit i covers input pixels
    `start + i * jump ... start + i * jump + size - 1` (clipped to the image); `size` is None when every
    unit sees the whole image (after a flatten or fully connected layer)."""

    name: str
    kind: str
    out_hw: tuple[int, ...] | None
    size: tuple[int, int] | None
    jump: tuple[int, int]
    start: tuple[int, int]

    def box(self, i: int, j: int, hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) inclusive input-pixel bounds of unit (i, j), clipped to the image."""
        if self.size is None:
            return 0, hw[0] - 1, 0, hw[1] - 1
        t = self.start[0] + i * self.jump[0]
        lft = self.start[1] + j * self.jump[1]
        return (max(t, 0), min(t + self.size[0] - 1, hw[0] - 1), max(lft, 0), min(lft + self.size[1] - 1, hw[1] - 1))


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _window(m: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]] | None:
    """(kernel, stride, padding, dilation) of a sliding-window module, None for a pointwise one."""
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        return k, s, p, _pair(getattr(m, "dilation", 1))
    if isinstance(m, SparseConv2d):
        conv = next(iter(m.convs.values()))
        return _pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
    if isinstance(m, Subsampling):
        return _pair(m.kernel_size), _pair(m.kernel_size), (0, 0), (1, 1)
    return None


GLOBAL = (nn.Linear, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POINTWISE = RECTIFIERS + PASS_THROUGH + (nn.BatchNorm2d,)


def receptive_fields(chain: Chain) -> list[Field]:
    """The receptive field of every chained unit, from the layers' kernel, stride, padding and dilation
    (r_out = r_in + (k - 1) d j_in, j_out = j_in s, start_out = start_in - p j_in)."""
    size, jump, start = (1, 1), (1, 1), (0, 0)
    out = []
    for u in chain.chained:
        m, w = u.module, _window(u.module)
        if size is None or isinstance(m, GLOBAL):
            if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and size is not None and \
                    tuple(u.output.shape[-2:]) == tuple(u.input.shape[-2:]):
                pass  # an adaptive pool to the size it already has does nothing
            else:
                size = None
        elif w is not None:
            k, s, p, d = w
            size = tuple(size[a] + (k[a] - 1) * d[a] * jump[a] for a in range(2))
            start = tuple(start[a] - p[a] * jump[a] for a in range(2))
            jump = tuple(jump[a] * s[a] for a in range(2))
        elif not isinstance(m, POINTWISE):
            raise ValueError(f"receptive field: no rule for {type(m).__name__} ({u.name})")
        hw = tuple(u.output.shape[-2:]) if u.output.dim() == 4 else None
        out.append(Field(u.name, type(m).__name__, hw, size, jump, start))
    return out


def receptive_field_table(fields: Sequence[Field], input_hw: tuple[int, int]) -> str:
    """The fields as a Markdown table: layer, type, output size, RF size, stride, share of the image."""
    rows = ["| layer | type | output | receptive field | stride | of the image |", "|---|---|---|---:|---:|---:|"]
    for f in fields:
        out = "x".join(map(str, f.out_hw)) if f.out_hw else "-"
        if f.size is None:
            rf, share = "global", "100%"
        else:
            rf = f"{f.size[0]}x{f.size[1]}"
            share = f"{100 * min(f.size[0], input_hw[0]) * min(f.size[1], input_hw[1]) / math.prod(input_hw):.1f}%"
        rows.append(f"| {f.name} | {f.kind} | {out} | {rf} | {f.jump[0]} | {share} |")
    return "\n".join(rows)
