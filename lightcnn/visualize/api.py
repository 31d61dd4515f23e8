"""The insight tools as functions: `visualize` writes the pictures of one model and a few images;
`feature_evolution` writes Fig. 4 from snapshots saved during training (`FeatureSnapshots`)."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightcnn.visualize import analysis, attribution, plots
from lightcnn.visualize.core import (
    POINTWISE,
    RECTIFIERS,
    Chain,
    denormalize,
    load_model,
    receptive_field_table,
    receptive_fields,
    require_chain_layer,
    resolve_layer,
    trace_chain,
)
from lightcnn.visualize.deconvnet import project_strongest
from lightcnn.visualize.names import label, short_label

WHAT = ("filters", "maps", "deconv", "occlusion", "rf", "invariance", "gradcam", "guided", "erf")
CHAIN_ONLY = ("deconv", "rf")  # the deconvnet and the analytic receptive fields need a plain chain


def default_layers(chain: Chain) -> list[str]:
    """The non-linearity after each convolution of the chain (the paper's "layer 1 ... 5" features)."""
    out, after_conv = [], False
    for u in chain.chained:
        if isinstance(u.module, (nn.Conv2d,)) or type(u.module).__name__ == "SparseConv2d":
            after_conv = True
        elif isinstance(u.module, RECTIFIERS) and after_conv and u.output.dim() == 4:
            out.append(u.name)
            after_conv = False
    return out


def spatial_stages(model: nn.Module, x: torch.Tensor, most: int = 6) -> list[str]:
    """Up to `most` modules with a spatial output, evenly spread over the network, at the shallowest
    nesting depth that has at least three (a residual network's stem and stages, an Inception network's
    modules), and the last module with a spatial output (Grad-CAM's layer): the layers of the empirical
    receptive field by default."""
    outs = attribution.module_outputs(model, x[:1])
    mods = dict(model.named_modules())
    counts: dict[str, int] = {}
    for n, _ in outs:
        counts[n] = counts.get(n, 0) + 1
    spatial = list(dict.fromkeys(n for n, o in outs if isinstance(o, torch.Tensor) and o.dim() == 4
                                 and counts[n] == 1 and o.shape[-1] * o.shape[-2] > 1
                                 and not isinstance(mods[n], POINTWISE)))  # a BN or ReLU adds no reach
    for depth in range(1, 5):
        names = [n for n in spatial if n.count(".") + 1 == depth]
        if len(names) >= 3 or depth == 4:
            break
    names = names or spatial
    last = attribution.last_spatial_layer(model, x)  # e.g. DenseNet's final BatchNorm: the last block's reach
    if last not in names:
        names = names[-(most - 1):] if len(names) >= most else names
        names.append(last)
    if len(names) > most:
        idx = torch.linspace(0, len(names) - 1, most).round().long().tolist()
        names = [names[i] for i in sorted(set(idx))]
    return names


def _file(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def visualize(model: nn.Module, x: torch.Tensor, out: str | Path, labels: Sequence[int | None] | None = None,
              layers: Sequence[str] | None = None, what: Sequence[str] = WHAT, top: int = 9,
              occlusion_size: int | None = None, occlusion_stride: int | None = None,
              title: str = "", verbose: bool = True) -> dict[str, list[Path]]:
    """Write the pictures `what` (a subset of WHAT) for `model` (eval mode) on the normalised images `x`
    into the folder `out`; return {what: [paths]}.

    `layers` are module names (`model.named_modules()`, or a unique suffix such as "conv5"); by default
    the non-linearity after each convolution. `labels` are the images' classes (the predicted class where
    None), used by the occlusion map and the invariance curves. `top` is the number of strongest units
    projected per layer. The occlusion square defaults to 1/6 of the image side (stride: a quarter of it).
    """
    unknown = [w for w in what if w not in WHAT]
    if unknown:
        raise ValueError(f"unknown picture(s) {unknown}; choose from {', '.join(WHAT)}")
    model.eval()
    out = Path(out)
    title = title or type(model).__name__
    explicit_layers = bool(layers)
    chain = trace_chain(model, x)
    if not torch.isfinite(chain.logits).all():
        raise ValueError(f"{title}: the network's outputs on these images are NaN or Inf (diverged weights?); "
                         f"the pictures would be blank")
    by_layer = ("maps", "deconv", "invariance")
    if layers:
        layers = [resolve_layer(model, n) for n in layers]
    else:
        layers = default_layers(chain)
        if not layers and any(w in what for w in by_layer):
            raise ValueError(f"{title}: no conv/non-linearity chain to take default layers from; give layers "
                             f"(valid: {', '.join(n for n, _ in model.named_modules() if n)})")
    preds = chain.logits.argmax(1).tolist()
    targets = [p if lab is None else int(lab) for lab, p in zip(labels or [None] * len(x), preds)]
    images = denormalize(x, model)
    hw = tuple(x.shape[-2:])
    written: dict[str, list[Path]] = {}
    fields = None
    if any(w in what for w in ("deconv", "rf")):
        for n in layers if "deconv" in what else ():
            require_chain_layer(model, chain, n)
        fields = {f.name: f for f in receptive_fields(chain)}
    if "filters" in what:
        name, conv = analysis.first_conv(model)
        written["filters"] = [plots.filters_grid(conv.weight.detach().cpu(),
                                                 f"{title}: {name} filters {tuple(conv.weight.shape)}",
                                                 out / "filters.png")]
    if "maps" in what:
        outputs, _ = analysis.layer_outputs(model, x[:1], layers)
        written["maps"] = []
        for n in layers:
            if outputs[n].dim() != 4:
                raise ValueError(f"layer {n!r} has no feature maps (output shape {tuple(outputs[n].shape)})")
            written["maps"].append(plots.feature_maps(outputs[n][0], images[0],
                                                      f"{title}: {label(model, n)} on image 0",
                                                      out / f"maps_{_file(n)}.png"))
    if "deconv" in what:
        written["deconv"] = []
        for n in layers:
            projs = project_strongest(chain, n, top)
            written["deconv"].append(plots.projections(
                projs, images, fields[n], f"{title}: deconvnet projections of the {len(projs)} strongest "
                f"units of {label(model, n)} (RF {fields[n].size[0]} px)", out / f"deconv_{_file(n)}.png"))
    if "rf" in what:
        table = receptive_field_table(list(fields.values()), hw)
        (out / "receptive_fields.md").parent.mkdir(parents=True, exist_ok=True)
        (out / "receptive_fields.md").write_text(table + "\n")
        if verbose:
            print(f"Receptive fields of {title} at {hw[0]}x{hw[1]}:\n{table}")
        names = {f: short_label(model, f) for f in fields}
        written["rf"] = [plots.receptive_fields(list(fields.values()), images[0], f"{title}: receptive fields",
                                                out / "receptive_fields.png", names), out / "receptive_fields.md"]
    if "occlusion" in what:
        size = occlusion_size or max(2, hw[0] // 6)
        stride = occlusion_stride or max(1, size // 4)
        written["occlusion"] = []
        for i in range(len(x)):
            prob = analysis.occlusion_map(model, x[i:i + 1], targets[i], size, stride)
            written["occlusion"].append(plots.occlusion(images[i], prob, size, stride,
                                                        f"{title}: occlusion, class {targets[i]}",
                                                        out / f"occlusion_{i}.png"))
    if "invariance" in what:
        chosen = layers if len(layers) <= 2 else [layers[0], layers[-1]]
        res = analysis.invariance(model, x, chosen, targets)
        written["invariance"] = [plots.invariance(res, [f"image {i} (class {t})" for i, t in enumerate(targets)],
                                                  f"{title}: invariance", out / "invariance.png",
                                                  {n: label(model, n) for n in chosen})]
    if "gradcam" in what or "guided" in what:
        cam_layer = layers[-1] if explicit_layers else None
        att = attribution.attribute(model, x, targets, cam_layer)
        rows = [f"image {i}, class {t}" for i, t in enumerate(targets)]
        if "gradcam" in what:
            written["gradcam"] = [plots.attributions(att, images, rows, f"{title}: Grad-CAM at "
                                                     f"{label(model, att.layer)} (Selvaraju et al. 2017)",
                                                     out / "gradcam.png", layer_label=short_label(model, att.layer))]
        if "guided" in what:
            written["guided"] = [plots.attributions(att, images, rows, f"{title}: guided backpropagation "
                                                    "(Springenberg et al. 2015)", out / "guided_backprop.png",
                                                    guided_only=True)]
    if "erf" in what:
        erf_layers = layers if explicit_layers else (
            default_layers(chain) if chain.broken_at is None and default_layers(chain) else spatial_stages(model, x))
        efs = [attribution.effective_receptive_field(model, x, n) for n in erf_layers]
        try:  # the analytic field where the layer is in the plain chain (all of it for LeNet, AlexNet, VGG)
            analytic = {f.name: f for f in receptive_fields(chain)}
        except ValueError:
            analytic = {}
        names = {n: short_label(model, n) for n in erf_layers}
        written["erf"] = [plots.effective_fields(
            efs, analytic, images[0], names, f"{title}: empirical receptive fields (Luo et al. 2016), mean over "
            f"{len(x)} image(s)", out / "effective_receptive_fields.png")]
    return written


def _epoch_of(path: Path) -> str:
    m = re.search(r"epoch=(\d+)", path.name)
    return f"epoch {int(m.group(1))}" if m else path.stem


def snapshot_files(snapshots: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder of snapshots (`*.pt`/`*.ckpt`, in epoch order) or a list of files."""
    if not isinstance(snapshots, (str, Path)) and len(snapshots) == 1:
        snapshots = snapshots[0]
    if isinstance(snapshots, (str, Path)) and Path(snapshots).is_dir():
        files = sorted(list(Path(snapshots).glob("*.pt")) + list(Path(snapshots).glob("*.ckpt")),
                       key=lambda p: (int(m.group(1)) if (m := re.search(r"epoch=(\d+)", p.name)) else 1 << 30, p.name))
        if not files:
            raise FileNotFoundError(f"no snapshots (*.pt, *.ckpt) in {str(snapshots)!r}")
        return files
    files = [Path(snapshots)] if isinstance(snapshots, (str, Path)) else [Path(s) for s in snapshots]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"snapshot(s) {missing} do not exist (give a folder of FeatureSnapshots or checkpoint files)")
    return files


def feature_evolution(name: str | None, snapshots: str | Path | Sequence[str | Path], x: torch.Tensor,
                      out: str | Path, layers: Sequence[str] | None = None, maps: int = 4,
                      max_columns: int = 8, **overrides) -> Path:
    """Fig. 4: for each layer, `maps` feature maps (the strongest ones of the last snapshot) at each of
    (at most `max_columns`, evenly chosen) snapshots: the projection of the map's strongest activation
    over the images `x`. Writes `out/evolution.png`."""
    files = snapshot_files(snapshots)
    if len(files) > max_columns:
        idx = torch.linspace(0, len(files) - 1, max_columns).round().long().tolist()
        files = [files[i] for i in sorted(set(idx))]
    last = load_model(name, files[-1], **overrides)
    chain = trace_chain(last, x)
    layers = [require_chain_layer(last, chain, n) for n in layers] if layers else default_layers(chain)
    chosen = {n: [p.channel for p in project_strongest(chain, n, maps)] for n in layers}
    fields = {f.name: f for f in receptive_fields(chain)}
    grid: dict[str, list] = {n: [] for n in layers}
    for f in files:
        model = last if f == files[-1] else load_model(name, f, **overrides)
        ch = chain if model is last else trace_chain(model, x)
        for n in layers:
            grid[n].append(project_strongest(ch, n, channels=chosen[n]))
    title = f"{name or type(last).__name__}: feature evolution during training"
    return plots.evolution(grid, tuple(x.shape[-2:]), fields, [_epoch_of(f) for f in files], title,
                           Path(out) / "evolution.png")
