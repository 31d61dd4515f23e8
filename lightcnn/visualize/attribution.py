"""Where a network looks, for any network (plain chains, residual, dense, Inception): Grad-CAM (Selvaraju
et al. 2017), guided backpropagation (Springenberg et al. 2015) and guided Grad-CAM through Captum, and
the empirical receptive field (Luo et al. 2016, "Understanding the effective receptive field in deep
convolutional neural networks"): the gradient of one unit at the centre of a layer's map with respect to
the input image.

The attributions run on a copy of the model whose kernel-backed layers use the PyTorch reference ops and
whose ReLUs are not in-place, so that Captum's hooks see every `nn.ReLU` module; a ReLU applied as a
function (`F.relu`, e.g. after DenseNet's last BatchNorm) is differentiated as usual by guided
backpropagation rather than guided.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightcnn.layers import default_impl


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def attribution_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` on the reference ops, without in-place ReLUs."""
    twin = copy.deepcopy(model).eval()
    for m in twin.modules():
        if hasattr(m, "inplace") and isinstance(m.inplace, bool):
            m.inplace = False
        if isinstance(getattr(m, "impl", None), str) or (hasattr(m, "impl") and m.impl is None):
            m.impl = "reference"
    return twin


def module_outputs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, output) of every named module, in the order their forward passes finish."""
    order: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: order.append((n, out)))
             for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), default_impl("reference"):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def last_spatial_layer(model: nn.Module, x: torch.Tensor) -> str:
    """The module whose forward pass finishes last with a feature map larger than 1x1: the last
    convolutional stage (a residual stage, a dense block, an Inception module), Grad-CAM's layer."""
    names = [n for n, out in module_outputs(model, x[:1]) if isinstance(out, torch.Tensor) and out.dim() == 4
             and out.shape[-1] * out.shape[-2] > 1]
    if not names:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial (N, C, H, W) output larger than 1x1")
    return names[-1]


@dataclass
class Attribution:
    """Per image: `cam` Grad-CAM upsampled to the input (H, W), >= 0; `guided` guided backpropagation
    (C, H, W); `guided_cam` their product (guided Grad-CAM); the class `target` and the `layer` used."""

    layer: str
    targets: list[int]
    cam: torch.Tensor
    guided: torch.Tensor
    guided_cam: torch.Tensor


def _captum():
    try:
        import captum.attr as attr
    except ImportError:
        raise ValueError("Grad-CAM and guided backpropagation need Captum: pip install captum "
                         "(or pip install -e .[visualize])") from None
    return attr


def attribute(model: nn.Module, x: torch.Tensor, targets: Sequence[int], layer: str | None = None) -> Attribution:
    """Grad-CAM at `layer` (default: `last_spatial_layer`), guided backpropagation and guided Grad-CAM of
    class `targets[i]` for each image `x[i]`."""
    attr = _captum()
    twin = attribution_copy(model)
    layer = layer or last_spatial_layer(twin, x)
    module = dict(twin.named_modules())[layer]

    def forward(inp):
        return _logits(twin(inp))

    target = torch.as_tensor(list(targets), dtype=torch.long)
    x = x.detach().clone().requires_grad_(True)  # Captum warns about inputs that do not require grad
    with torch.enable_grad(), default_impl("reference"):
        cam = attr.LayerGradCam(forward, module).attribute(x, target=target, relu_attributions=True)
        if cam.dim() != 4:
            raise ValueError(f"Grad-CAM needs a layer with a spatial output; {layer!r} gives {tuple(cam.shape)}")
        cam = F.interpolate(cam.detach(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        with warnings.catch_warnings():  # Captum announces the ReLU hooks it sets and removes again
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            guided = attr.GuidedBackprop(twin).attribute(x, target=target).detach()
    return Attribution(layer, [int(t) for t in targets], cam, guided, guided * cam[:, None])


@dataclass
class EffectiveField:
    """The empirical receptive field of one layer: `grad` (H, W) the mean over images of |d unit / d input|
    summed over the input channels, for the unit at the centre of the layer's map (summed over its
    channels), and `side`: the side of the smallest square about that centre holding `mass` of it."""

    layer: str
    grad: torch.Tensor
    centre: tuple[int, int]
    side: int
    mass: float


class _Stop(Exception):
    pass


def effective_receptive_field(model: nn.Module, x: torch.Tensor, layer: str, mass: float = 0.95) -> EffectiveField:
    """Luo et al. 2016: set the gradient of the centre unit of `layer`'s output (all its channels) to 1 and
    everything else to 0, back-propagate to the images `x`; the field is where the gradient is not
    negligible. Works for any network (the forward pass stops at `layer`)."""
    twin = attribution_copy(model)
    module = dict(twin.named_modules())[layer]
    caught: list[torch.Tensor] = []

    def hook(m, a, out):
        caught.append(out)
        raise _Stop

    inp = x.detach().clone().requires_grad_(True)
    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad(), default_impl("reference"):
            try:
                twin(inp)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not caught:
        raise ValueError(f"layer {layer!r} does not run in the forward pass")
    out = caught[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ValueError(f"layer {layer!r} has no spatial output (shape {tuple(getattr(out, 'shape', ()))})")
    h, w = out.shape[-2:]
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), inp)
    g = grad.abs().sum(1).mean(0)  # (H, W)
    centre = _input_centre(g)
    return EffectiveField(layer, g, centre, _side(g, centre, mass), mass)


def _input_centre(g: torch.Tensor) -> tuple[int, int]:
    """The gradient's centre of mass (row, col), rounded."""
    total = g.sum().clamp_min(1e-30)
    rows = (g.sum(1) * torch.arange(g.shape[0])).sum() / total
    cols = (g.sum(0) * torch.arange(g.shape[1])).sum() / total
    return int(rows.round()), int(cols.round())


def _side(g: torch.Tensor, centre: tuple[int, int], mass: float) -> int:
    """The side of the smallest square centred at `centre` that holds `mass` of the gradient (odd sides)."""
    total = float(g.sum())
    if total <= 0:
        return 0
    r, c = centre
    for half in range(max(g.shape)):
        box = g[max(r - half, 0):r + half + 1, max(c - half, 0):c + half + 1]
        if float(box.sum()) >= mass * total:
            return 2 * half + 1
    return 2 * max(g.shape) - 1
