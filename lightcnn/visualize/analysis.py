"""The numbers behind the pictures: feature maps, occlusion sensitivity and invariance (Zeiler & Fergus
2014, Sec. 4.2 and Fig. 5, Fig. 7). Each function takes a model in eval mode and a normalised batch."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

from lightcnn.visualize.core import resolve_layer


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor,
                  layers: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The outputs of the named modules (any module of `named_modules()`) and the logits."""
    names = [resolve_layer(model, n) for n in layers]
    mods = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_hook(lambda m, a, y, n=n: out.__setitem__(n, y.detach().clone()))
               for n in names]
    try:
        logits = model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return out, logits


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name, m
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d layer whose filters could be shown")


@torch.no_grad()
def occlusion_map(model: nn.Module, x: torch.Tensor, target: int, size: int, stride: int,
                  batch_size: int = 64) -> torch.Tensor:
    """Sec. 4.2: the probability of class `target` while a grey square of side `size` (the data set's
    mean: zero in the normalised input) is slid over the image `x` (1, C, H, W) with `stride`. Returns the
    map (rows, cols) of probabilities, entry (i, j) for the square at top-left (i * stride, j * stride)."""
    _, _, h, w = x.shape
    if not 0 < size <= min(h, w) or stride <= 0:
        raise ValueError(f"occlusion square {size} with stride {stride} does not fit a {h}x{w} image")
    tops, lefts = range(0, h - size + 1, stride), range(0, w - size + 1, stride)
    boxes = [(t, lft) for t in tops for lft in lefts]
    probs = []
    for b in range(0, len(boxes), batch_size):
        chunk = x.repeat(len(boxes[b:b + batch_size]), 1, 1, 1)
        for k, (t, lft) in enumerate(boxes[b:b + batch_size]):
            chunk[k, :, t:t + size, lft:lft + size] = 0.0
        probs.append(F.softmax(model(chunk), 1)[:, target])
    return torch.cat(probs).view(len(tops), len(lefts))


TRANSFORMS = {
    # Fig. 5: vertical translation (pixels, as a share of the side here), scale, rotation (degrees)
    "translation": torch.linspace(-0.25, 0.25, 11),
    "scale": torch.linspace(0.6, 1.6, 11),
    "rotation": torch.linspace(0.0, 360.0, 13),
}


def transform(x: torch.Tensor, kind: str, amount: float) -> torch.Tensor:
    """`x` translated vertically by `amount` of its height, scaled by `amount`, or rotated by `amount`
    degrees about its centre; uncovered pixels are the mean (0 in the normalised input)."""
    h = x.shape[-2]
    if kind == "translation":
        return TF.affine(x, angle=0.0, translate=[0, round(amount * h)], scale=1.0, shear=[0.0, 0.0], fill=0.0)
    if kind == "scale":
        return TF.affine(x, angle=0.0, translate=[0, 0], scale=amount, shear=[0.0, 0.0],
                         interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    if kind == "rotation":
        return TF.rotate(x, amount, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    raise ValueError(f"unknown transformation {kind!r}; choose from {', '.join(TRANSFORMS)}")


@dataclass
class Invariance:
    """Fig. 5 for one transformation: `amounts` (T,), `distance[layer]` (N images, T) the Euclidean
    distance between the layer's features of the transformed and of the original image, divided by the
    norm of the original's, and `probability` (N, T) of each image's class."""

    kind: str
    amounts: torch.Tensor
    distance: dict[str, torch.Tensor]
    probability: torch.Tensor


@torch.no_grad()
def invariance(model: nn.Module, x: torch.Tensor, layers: Sequence[str], targets: Sequence[int],
               kinds: Sequence[str] = tuple(TRANSFORMS)) -> list[Invariance]:
    names = [resolve_layer(model, n) for n in layers]
    base, _ = layer_outputs(model, x, names)
    result = []
    for kind in kinds:
        if kind not in TRANSFORMS:
            raise ValueError(f"unknown transformation {kind!r}; choose from {', '.join(TRANSFORMS)}")
        amounts = TRANSFORMS[kind]
        dist = {n: torch.zeros(len(x), len(amounts)) for n in names}
        prob = torch.zeros(len(x), len(amounts))
        for t, a in enumerate(amounts.tolist()):
            feats, logits = layer_outputs(model, transform(x, kind, a), names)
            for n in names:
                d = (feats[n] - base[n]).flatten(1).norm(dim=1)
                dist[n][:, t] = d / base[n].flatten(1).norm(dim=1).clamp_min(1e-12)
            prob[:, t] = F.softmax(logits, 1)[torch.arange(len(x)), torch.as_tensor(list(targets))]
        result.append(Invariance(kind, amounts, dist, prob))
    return result
