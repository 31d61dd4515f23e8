"""The deconvnet of Zeiler & Fergus 2014 (Sec. 2.1): a unit's activation projected back to pixel space.

To look at one unit, every other activation of its layer is set to zero and the layer's output is sent
back down the network, layer by layer, through
- unpooling: each max-pool's switches (the location of the maximum of each pooling region, recorded in
  the forward pass) put the signal back where the maximum came from (overlapping windows add up);
- rectification: the reconstruction goes through the ReLU (we treat every pointwise non-linearity,
  e.g. LeNet-5's tanh, the same way);
- filtering: each convolution's transpose, with the same (flipped) filters, no bias.
Local response normalisation is passed through unchanged in the backward projection, as the paper does;
so are eval-mode dropout and identities. Average pooling and eval-mode BatchNorm are linear and use
their transpose. All linear steps are computed as the vector-Jacobian product of the module at its
recorded input, which for a convolution is exactly the transposed convolution and for a max-pool is
exactly unpooling with the switches.

Works for any network whose layers form a plain chain up to the chosen layer (LeNet-5, AlexNet, ZFNet,
VGG); see `lightcnn.visualize.core.trace_chain`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightcnn.visualize.core import PASS_THROUGH, RECTIFIERS, Chain, Unit


def _transpose(unit: Unit, signal: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The vector-Jacobian product of `unit` at its recorded input (images `rows`) with `signal`."""
    with torch.enable_grad():
        x = unit.input[rows].clone().requires_grad_(True)
        y = unit.module(x)
        (g,) = torch.autograd.grad(y, x, signal)
    return g


def project(chain: Chain, layer: str, signal: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Project `signal` (activations of `layer`'s output, one per image of `rows`) down to pixel space.

    `rows` picks, for each signal, the image of the traced batch whose switches and inputs are used
    (default: image i for signal i). Returns a tensor shaped like those input images."""
    i = chain.index[layer]
    units = chain.units[: i + 1]
    if not all(u.chained for u in units):
        raise ValueError(f"layer {layer!r} is not in the plain chain of the network (broken at {chain.broken_at!r})")
    rows = torch.arange(signal.shape[0]) if rows is None else rows
    s = signal
    for u in reversed(units):
        if isinstance(u.module, RECTIFIERS):
            s = F.relu(s)
        elif isinstance(u.module, PASS_THROUGH):
            pass
        else:
            s = _transpose(u, s, rows)
    return s


@dataclass
class Projection:
    """The projection of one unit: its channel, image, position (row, col) in the layer's map, activation,
    and the projection in (normalised) input space (C, H, W)."""

    layer: str
    channel: int
    image: int
    position: tuple[int, int]
    activation: float
    pixels: torch.Tensor


def strongest_units(act: torch.Tensor, top: int, channels: list[int] | None = None
                    ) -> list[tuple[int, int, tuple[int, int], float]]:
    """The strongest activation of each channel over all images and positions, as (channel, image,
    (row, col), value): the `top` strongest channels, or the listed `channels`."""
    _n, c, h, w = act.shape
    flat = act.permute(1, 0, 2, 3).reshape(c, -1)
    best, where = flat.max(1)
    chosen = channels if channels is not None else best.argsort(descending=True)[:top].tolist()
    out = []
    for ch in chosen:
        k = int(where[ch])
        img, rest = divmod(k, h * w)
        out.append((int(ch), img, divmod(rest, w), float(best[ch])))
    return out


def project_strongest(chain: Chain, layer: str, top: int = 9, channels: list[int] | None = None) -> list[Projection]:
    """The deconvnet projections of the strongest unit of the `top` most active channels of `layer` (or of
    the given `channels`), each alone: all other activations of the layer set to zero (Sec. 2.1)."""
    act = chain.units[chain.index[layer]].output
    if act.dim() != 4:
        raise ValueError(f"layer {layer!r} has no spatial output (shape {tuple(act.shape)})")
    units = strongest_units(act, top, channels)
    signal = torch.zeros((len(units),) + tuple(act.shape[1:]), dtype=act.dtype)
    for k, (ch, _, (r, c), v) in enumerate(units):
        signal[k, ch, r, c] = v
    rows = torch.tensor([img for _, img, _, _ in units], dtype=torch.long)
    pixels = project(chain, layer, signal, rows)
    return [Projection(layer, ch, img, pos, v, pixels[k]) for k, (ch, img, pos, v) in enumerate(units)]
