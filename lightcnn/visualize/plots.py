"""matplotlib pictures of the insight tools; each function writes one PNG and returns its path."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from lightcnn.visualize.analysis import Invariance
from lightcnn.visualize.core import Field
from lightcnn.visualize.deconvnet import Projection


def to_image(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> an array imshow takes (H, W) for one channel, (H, W, 3) for three; other
    channel counts are averaged."""
    t = t.detach().float().cpu()
    if t.shape[0] == 3:
        return t.permute(1, 2, 0).clamp(0, 1).numpy()
    return t.mean(0).clamp(0, 1).numpy()


def signed_image(t: torch.Tensor) -> torch.Tensor:
    """A signed tensor scaled into [0, 1] with 0 at grey, by its largest magnitude (the paper's display of
    projections: contrast-normalised, one scale per picture)."""
    m = t.abs().max().clamp_min(1e-12)
    return 0.5 + 0.5 * t / m


def _show(ax, img: np.ndarray, title: str | None = None, fontsize: int = 7) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def mosaic(tiles: Sequence[np.ndarray], cols: int, pad: int = 1, background: float = 1.0) -> np.ndarray:
    """Equal-sized (H, W, 3) tiles in a grid with `pad` pixels of `background` between them: one image,
    so a grid of hundreds of filters is one imshow rather than hundreds of axes."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), background, dtype=np.float32)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tile
    return out


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def _upsample(img: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlargement of tiny tiles (3x3 filters, 5x5 maps) so that they show as blocks."""
    k = max(1, math.ceil(min_side / min(img.shape[:2])))
    return img.repeat(k, 0).repeat(k, 1)


def filters_grid(weight: torch.Tensor, title: str, path: Path) -> Path:
    """The first layer's filters (out, in, kh, kw), each scaled to [0, 1] on its own (Fig. 6)."""
    tiles = []
    for w in weight.float():
        tiles.append(_upsample(_rgb(to_image((w - w.min()) / (w.max() - w.min()).clamp_min(1e-12))), 14))
    cols = math.ceil(math.sqrt(len(tiles)))
    grid = mosaic(tiles, cols, pad=max(1, tiles[0].shape[0] // 10))
    side = min(10, 0.5 * cols + 1)
    fig, ax = plt.subplots(figsize=(side, side * grid.shape[0] / grid.shape[1] + 0.4))
    _show(ax, grid)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def feature_maps(maps: torch.Tensor, image: torch.Tensor, title: str, path: Path, max_maps: int = 64) -> Path:
    """The image and the first `max_maps` feature maps (C, H, W) of one layer, each on its own scale
    (viridis: dark low, yellow high), row by row."""
    n = min(max_maps, maps.shape[0])
    tiles = []
    for m in maps[:n].float():
        m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        tiles.append(_upsample(plt.cm.viridis(m.numpy())[..., :3].astype(np.float32), 24))
    cols = min(8, n)
    grid = mosaic(tiles, cols, pad=max(1, tiles[0].shape[0] // 12))
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), gridspec_kw={"width_ratios": [1, 2]})
    _show(axes[0], to_image(image), "input", 9)
    _show(axes[1], grid, f"maps 0-{n - 1} of {maps.shape[0]} ({maps.shape[1]}x{maps.shape[2]}), row by row", 9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def projections(projs: Sequence[Projection], images: torch.Tensor, field: Field, title: str, path: Path) -> Path:
    """Fig. 2: top row the deconvnet projections of the strongest units (cropped to their receptive
    fields), bottom row the image patches that caused them."""
    n = len(projs)
    fig, axes = plt.subplots(2, n, figsize=(max(n, 2) * 1.2, 2.7), squeeze=False, layout="constrained")
    hw = tuple(images.shape[-2:])
    for k, p in enumerate(projs):
        t, b, lft, r = field.box(*p.position, hw)
        _show(axes[0, k], to_image(signed_image(p.pixels)[:, t:b + 1, lft:r + 1]), f"ch {p.channel}")
        _show(axes[1, k], to_image(images[p.image][:, t:b + 1, lft:r + 1]), f"img {p.image}")
    axes[0, 0].set_ylabel("projection", fontsize=7)
    axes[1, 0].set_ylabel("patch", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def occlusion(image: torch.Tensor, prob: torch.Tensor, size: int, stride: int, title: str, path: Path) -> Path:
    """Fig. 7: the image, and the probability of its class with the grey square centred at each point."""
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    img = to_image(image)
    _show(axes[0], img, "input", 9)
    _show(axes[1], img, "grey square", 9)
    axes[1].add_patch(Rectangle((-0.5, -0.5), size, size, color="0.5"))
    h, w = image.shape[-2:]
    rows, cols = prob.shape
    # each entry belongs to the centre of its square
    extent = (size / 2 - stride / 2 - 0.5, size / 2 + (cols - 0.5) * stride - 0.5,
              size / 2 + (rows - 0.5) * stride - 0.5, size / 2 - stride / 2 - 0.5)
    _show(axes[2], img)
    im = axes[2].imshow(prob.numpy(), cmap="jet", vmin=0, vmax=1, alpha=0.6, extent=extent, interpolation="nearest")
    axes[2].set_xlim(-0.5, w - 0.5)
    axes[2].set_ylim(h - 0.5, -0.5)
    axes[2].set_title("p(true class), square centred here", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def receptive_fields(fields: Sequence[Field], image: torch.Tensor, title: str, path: Path,
                     names: dict[str, str] | None = None) -> Path:
    """Local to global: the receptive-field side of every layer against depth, and the fields of the
    centre unit of each convolution and pooling layer drawn on the image. `names` maps module names to the
    labels shown (the paper's layer names)."""
    names = names or {}

    def short(n: str) -> str:
        return names.get(n) or (n if n.split(".")[-1].isdigit() else n.split(".")[-1])

    hw = tuple(image.shape[-2:])
    spatial = [f for f in fields if f.size is not None and f.out_hw is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
    ax = axes[0]
    xs = range(len(fields))
    sides = [f.size[0] if f.size is not None else np.nan for f in fields]
    ax.plot(xs, sides, "o-", color="C0", label="local: a window of the image")
    glob = [k for k, f in enumerate(fields) if f.size is None]
    if glob:
        ax.plot(glob, [hw[0]] * len(glob), "x", color="C3", label="global: the whole image")
    ax.axhline(hw[0], color="0.4", ls="--", lw=1, label=f"image side ({hw[0]} px)")
    ax.legend(fontsize=8, loc="lower right", title="receptive field of a unit", title_fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([short(f.name) for f in fields], rotation=90, fontsize=7)
    ax.set_xlabel("layer (in forward order)")
    ax.set_ylabel("receptive field side (pixels)")
    ax.set_title("receptive field by layer (analytic)", fontsize=9)
    ax.grid(alpha=0.3)
    ax = axes[1]
    _show(ax, to_image(image), "centre unit's field per layer", 9)
    ax.set_xlabel("x (pixels)", fontsize=8)
    ax.set_ylabel("y (pixels)", fontsize=8)
    windows = [f for f in spatial if f.kind not in ("ReLU", "Tanh", "LocalResponseNorm", "Dropout", "BatchNorm2d")]
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(windows), 1)))
    for f, c in zip(windows, colors):
        t, b, lft, r = f.box(f.out_hw[0] // 2, f.out_hw[1] // 2, hw)
        ax.add_patch(Rectangle((lft - 0.5, t - 0.5), r - lft + 1, b - t + 1, fill=False, ec=c, lw=1.5,
                               label=f"{short(f.name)}: {f.size[0]} px"))
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title="layer: field side",
              title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _overlay(ax, img: np.ndarray, heat: np.ndarray, title: str):
    _show(ax, img, title, 8)
    return ax.imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=0.5, interpolation="bilinear")


def attributions(att, images: torch.Tensor, row_labels: Sequence[str], title: str, path: Path,
                 guided_only: bool = False, layer_label: str | None = None) -> Path:
    """One row per image. Grad-CAM: the input, the class-activation map over it (each map scaled to its
    maximum), guided Grad-CAM; `guided_only`: the input and guided backpropagation. Signed pictures are
    grey at 0."""
    n = len(images)
    cols = 2 if guided_only else 3
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols + 0.8, 2.5 * n + 0.4), squeeze=False,
                             layout="constrained")
    heat = None
    for i in range(n):
        img = to_image(images[i])
        _show(axes[i, 0], img, "input" if i == 0 else None, 8)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
        if guided_only:
            _show(axes[i, 1], to_image(signed_image(att.guided[i])), "guided backpropagation" if i == 0 else None, 8)
            continue
        cam = att.cam[i] / att.cam[i].max().clamp_min(1e-12)
        heat = _overlay(axes[i, 1], img, cam.numpy(), f"Grad-CAM at {layer_label or att.layer}" if i == 0 else None)
        _show(axes[i, 2], to_image(signed_image(att.guided_cam[i])), "guided Grad-CAM" if i == 0 else None, 8)
    if heat is not None:
        fig.colorbar(heat, ax=axes[:, 1], fraction=0.046, label="Grad-CAM (share of its maximum)")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def effective_fields(fields, analytic: dict, image: torch.Tensor, names: dict[str, str], title: str,
                     path: Path) -> Path:
    """Luo et al. 2016: top, for each layer, |d centre unit / d input| over the image (each on its own
    scale) with the square that holds the chosen share of it and, for plain chains, the analytic receptive
    field; bottom, both sides against depth."""
    k = len(fields)
    fig = plt.figure(figsize=(max(2.3 * k, 7), 6.2), layout="constrained")
    grid = fig.add_gridspec(2, k, height_ratios=[1, 1])
    hw = tuple(image.shape[-2:])
    img = to_image(image)
    im = None
    for j, f in enumerate(fields):
        ax = fig.add_subplot(grid[0, j])
        g = (f.grad / f.grad.max().clamp_min(1e-30)).numpy()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, alpha=0.35, interpolation="nearest")
        im = ax.imshow(g, cmap="magma", vmin=0, vmax=1, alpha=0.8, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(names.get(f.layer, f.layer), fontsize=7)
        r, c, half = f.centre[0], f.centre[1], f.side // 2
        ax.add_patch(Rectangle((c - half - 0.5, r - half - 0.5), f.side, f.side, fill=False, ec="cyan", lw=1.2,
                               label=f"empirical ({f.mass:.0%} of the gradient)"))
        a = analytic.get(f.layer)
        if a is not None and a.size is not None and a.out_hw is not None:
            t, b, lft, rt = a.box(a.out_hw[0] // 2, a.out_hw[1] // 2, hw)
            ax.add_patch(Rectangle((lft - 0.5, t - 0.5), rt - lft + 1, b - t + 1, fill=False, ec="lime", ls="--",
                                   lw=1.2, label="analytic"))
        if j == 0:
            ax.set_ylabel("y (pixels)", fontsize=7)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.02), frameon=False)
    if im is not None:
        fig.colorbar(im, ax=fig.axes[:k], fraction=0.03, label="|d unit / d input| (share of max)")
    ax = fig.add_subplot(grid[1, :])
    xs = range(k)
    ax.plot(xs, [f.side for f in fields], "o-", color="C1", label=f"empirical: square with {fields[0].mass:.0%} "
            "of the gradient" if fields else "empirical")
    sides = [analytic[f.layer].size[0] if analytic.get(f.layer) is not None and analytic[f.layer].size is not None
             else np.nan for f in fields]
    if not all(np.isnan(sides)):
        ax.plot(xs, sides, "s--", color="C0", label="analytic (kernel, stride, padding)")
    ax.axhline(hw[0], color="0.4", ls=":", lw=1, label=f"image side ({hw[0]} px)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([names.get(f.layer, f.layer) for f in fields], rotation=30, fontsize=7, ha="right")
    ax.set_xlabel("layer (in forward order)")
    ax.set_ylabel("receptive field side (pixels)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def invariance(results: Sequence[Invariance], names: Sequence[str], title: str, path: Path,
               layer_names: dict[str, str] | None = None) -> Path:
    """Fig. 5: one column per transformation; rows: the relative feature distance of each layer, then
    the probability of the image's class; one line per image. `layer_names`: the labels of the layers."""
    layer_names = layer_names or {}
    layers = list(results[0].distance)
    rows = len(layers) + 1
    fig, axes = plt.subplots(rows, len(results), figsize=(3.4 * len(results), 2.2 * rows), squeeze=False)
    units = {"translation": "vertical shift (share of height)", "scale": "scale factor", "rotation": "degrees"}
    for c, res in enumerate(results):
        a = res.amounts.numpy()
        for r, layer in enumerate(layers):
            ax = axes[r, c]
            for i, name in enumerate(names):
                ax.plot(a, res.distance[layer][i].numpy(), "o-", ms=3, label=name)
            ax.set_title(f"{res.kind}: {layer_names.get(layer, layer)}", fontsize=8)
            ax.set_ylabel("feature distance / norm", fontsize=7)
            ax.grid(alpha=0.3)
        ax = axes[-1, c]
        for i, name in enumerate(names):
            ax.plot(a, res.probability[i].numpy(), "o-", ms=3, label=name)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{res.kind}: p(class)", fontsize=8)
        ax.set_xlabel(units.get(res.kind, res.kind), fontsize=8)
        ax.set_ylabel("p(class)", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=6, loc="best", title="image", title_fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def evolution(grid: dict[str, list[list[Projection]]], hw: tuple[int, int], fields: dict[str, Field],
              epochs: Sequence[str], title: str, path: Path) -> Path:
    """Fig. 4: for each layer, a few feature maps (rows) at each snapshot (columns): the projection of
    the map's strongest activation over the images, cropped to its receptive field."""
    rows = sum(len(v[0]) for v in grid.values())
    cols = len(epochs)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.95 + 0.8, rows * 0.95 + 0.5), squeeze=False,
                             layout="constrained")
    r = 0
    for layer, per_epoch in grid.items():
        for k in range(len(per_epoch[0])):
            for c, projs in enumerate(per_epoch):
                p = projs[k]
                t, b, lft, rt = fields[layer].box(*p.position, hw)
                _show(axes[r, c], to_image(signed_image(p.pixels)[:, t:b + 1, lft:rt + 1]))
                if r == 0:
                    axes[r, c].set_title(epochs[c], fontsize=7)
            short = layer if layer.split(".")[-1].isdigit() else layer.split(".")[-1]  # "features.4", "relu5"
            axes[r, 0].set_ylabel(f"{short}\nch {per_epoch[0][k].channel}", fontsize=6)
            r += 1
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
