"""What every lightcnn network shares: the `Classifier` API (timm's: `forward_features`, `forward_head`,
`forward_intermediates`, `feature_info`, `reset_classifier`, `get_classifier`, `set_grad_checkpointing`),
`FeatureExtractor` (what `create(name, features_only=True)` returns), `make_default_cfg` and the He
initialiser. docs/model_api.md is the manual."""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Collection, Sequence
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn
from torch.fx import _symbolic_trace

from lightcnn.constants import DATASETS


def make_default_cfg(dataset: str, num_classes: int, in_chans: int, input_size: int | tuple[int, int] | None = None,
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, **extra) -> dict:
    """The one way a model states what it expects: `{input_size: (C, H, W), mean, std, dataset, num_classes}`
    built from the model's real knobs; the data modules apply it unless a recipe says otherwise.

    `dataset` names the paper's data set (a key of `lightcnn.constants.DATASETS`), or "cifar" for the
    CIFAR nets, which take CIFAR-100 for 100 classes and CIFAR-10 otherwise. `input_size` is the side (or
    (H, W)) the model is built for, the data set's native side by default. `mean`/`std` are the data set's
    when they have `in_chans` entries, 0.5/0.5 per channel otherwise; a paper that prescribes its own
    input normalisation passes it (one value, repeated over the channels, or one per channel). `extra`
    adds model-specific entries (e.g. crop_pct)."""
    if dataset == "cifar":
        dataset = "cifar100" if num_classes == 100 else "cifar10"
    if dataset not in DATASETS:
        raise ValueError(f"make_default_cfg: unknown dataset {dataset!r}; known: cifar, {', '.join(DATASETS)}")
    facts = DATASETS[dataset]
    if (mean is None) != (std is None):
        raise ValueError("make_default_cfg: give both mean and std, or neither")
    if mean is None:
        mean, std = facts["mean"], facts["std"]
        if len(mean) != in_chans:
            mean, std = (0.5,) * in_chans, (0.5,) * in_chans
    else:
        mean, std = (tuple(v) * in_chans if len(v) == 1 else tuple(v) for v in (mean, std))
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"make_default_cfg: mean {mean} / std {std} need 1 or {in_chans} values")
    side = facts["input_side"] if input_size is None else input_size
    hw = (side, side) if isinstance(side, int) else tuple(side)
    return dict(input_size=(in_chans, *hw), mean=tuple(mean), std=tuple(std), dataset=dataset,
                num_classes=num_classes, **extra)


@torch.no_grad()
def init_he_(model: nn.Module, mode: Literal["fan_in", "fan_out"] = "fan_out") -> None:
    """He et al. 2015 ("Delving deep into rectifiers") normal init of every convolution, std sqrt(2 / fan),
    with zero conv biases and identity BatchNorms. `mode` is the fan the authors' code divides by: fan_out
    (k*k*out) in fb.resnet.torch and the pre-activation ResNet code, fan_in (k*k*in) in WRN's `MSRinit`
    and stochastic depth's `nninit.kaiming`."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def init_caffe_xavier_(model: nn.Module, bias: float = 0.0, zero_bias: Collection[nn.Module] = ()) -> None:
    """Caffe's "xavier" filler on every convolution and linear layer: U(+-sqrt(3 / fan_in)), variance
    1 / fan_in; biases `bias`, except those of the `zero_bias` layers (0)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = math.sqrt(3.0 / m.weight[0].numel())
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0 if m in zero_bias else bias)


class FeatureInfo(list):
    """The stages of a network, shallow to deep: a list of `{"module": name, "num_chs": channels,
    "reduction": cumulative stride}` (timm's layout), with timm's accessors."""

    def channels(self, idx: int | None = None) -> int | list[int]:
        return [f["num_chs"] for f in self] if idx is None else self[idx]["num_chs"]

    def reduction(self, idx: int | None = None) -> int | list[int]:
        return [f["reduction"] for f in self] if idx is None else self[idx]["reduction"]

    def module_name(self, idx: int | None = None) -> str | list[str]:
        return [f["module"] for f in self] if idx is None else self[idx]["module"]


def feature_take_indices(num_stages: int, indices: int | Sequence[int] | None = None) -> list[int]:
    """timm's stage selection: None = every stage, an int n = the last n, a sequence = those stages
    (negative indices count from the end)."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 1 <= indices <= num_stages:
            raise ValueError(f"indices={indices}: this network has {num_stages} stages; take 1..{num_stages} of them")
        return list(range(num_stages - indices, num_stages))
    take = []
    for i in indices:
        if not isinstance(i, int) or not -num_stages <= i < num_stages:
            raise ValueError(f"stage index {i!r} is out of range: this network has {num_stages} stages "
                             f"(0..{num_stages - 1}, or negative from the end)")
        take.append(i % num_stages)
    return take


# torch.fx symbolic tracing (torchvision's create_feature_extractor) hands modules Proxies, not tensors.
is_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@contextlib.contextmanager
def _buffers_restored(module: nn.Module):
    """Recomputing a checkpointed module in the backward must not update its BatchNorm running statistics
    (or any other buffer) a second time: put them back as they were before the recomputation."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def _checkpointed_forward(module: nn.Module, *args, **kwargs):
    """`module`'s own forward under activation checkpointing (non-reentrant, RNG state preserved, so that
    dropout, drop-path and stochastic depth draw the same in the recomputation)."""
    forward = type(module).forward
    if not torch.is_grad_enabled() or is_fx_tracing() or torch.jit.is_tracing():
        return forward(module, *args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        forward, module, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _buffers_restored(module)), **kwargs)


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _stride(module: nn.Module) -> int:
    """The largest stride of a convolution or pooling inside `module` (1 if none)."""
    stride = 1
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = max(stride, m.stride[0] if isinstance(m.stride, tuple) else m.stride)
    return stride


def _out_channels(module: nn.Module, channels: int) -> int:
    """The channels after `module`, given `channels` before it (its `out_channels`, or its last conv's)."""
    if isinstance(getattr(module, "out_channels", None), int):
        return module.out_channels
    if isinstance(module, nn.Sequential):
        for child in module:
            channels = _out_channels(child, channels)
        return channels
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else channels


def sequential_stages(seq: nn.Sequential, prefix: str, channels: int, reduction: int = 1) -> list[tuple[str, int, int]]:
    """The stages of a plain chain of modules (`stage_specs`'s format): the last module before each strided
    one, and the last module. `channels`/`reduction`: those of the chain's input."""
    specs, prev = [], None
    for name, child in seq.named_children():
        stride = _stride(child)
        if stride > 1 and prev is not None:
            specs.append(prev)
        reduction *= stride
        channels = _out_channels(child, channels)
        prev = (f"{prefix}.{name}", channels, reduction)
    return specs + [prev]


class Classifier(nn.Module):
    """Base of every network: `forward(x) == forward_head(forward_features(x))`.

    Subclasses set `num_classes`, `in_chans`, `num_features` (the classifier's input width) and
    `default_cfg` (with `make_default_cfg`), and implement `forward_features` (the last feature map, before
    pooling) and `forward_head` (pooling, dropout, classifier; `pre_logits=True` stops before the
    classifier). Models with auxiliary heads override `forward` to return a named tuple while training.

    The rest of timm's model API is generic, driven by two declarations of each family:
    `stage_specs()`, the modules whose outputs are the stage feature maps with their channels and cumulative
    stride, and `classifier_name` (plus `aux_classifier_names()` for auxiliary heads).
    """

    num_classes: int
    in_chans: int
    num_features: int
    default_cfg: dict
    classifier_name: str = "fc"  # path of the final classifier module
    grad_checkpointing: bool = False

    # --- declarations (per family) ------------------------------------------------------------------------
    def stage_specs(self) -> list[tuple[str, int, int]]:
        """(module path, output channels, cumulative stride) of each stage, shallow to deep: the module's
        output is the stage's feature map (a list of maps is concatenated along the channels)."""
        raise NotImplementedError(f"{type(self).__name__} declares no stages")

    def aux_classifier_names(self) -> list[str]:
        """Paths of the auxiliary heads' final classifiers (reset with the main one)."""
        return []

    def new_classifier(self, old: nn.Module, num_classes: int) -> nn.Module:
        """The classifier `reset_classifier` puts in place of `old` (a Linear of the same input width)."""
        in_features = old.in_features if isinstance(old, nn.Linear) else self.num_features
        ref = next(old.parameters(), next(self.parameters(), None))
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        return nn.Linear(in_features, num_classes, **kw)

    # --- timm's model API -----------------------------------------------------------------------------------
    @property
    def feature_info(self) -> FeatureInfo:
        return FeatureInfo(dict(module=m, num_chs=c, reduction=r) for m, c, r in self.stage_specs())

    def check_input(self, x: torch.Tensor) -> None:
        """One clear error for an input that is no (N, in_chans, H, W) batch; skipped while FX traces (a
        Proxy has no shape to check), so torchvision's create_feature_extractor works."""
        if is_fx_tracing():
            return
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects images of shape (N, {self.in_chans}, H, W), got "
                             f"{tuple(x.shape)}; build it with in_chans={x.shape[1] if x.ndim == 4 else '?'} "
                             "for other inputs")

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False):
        """The stage feature maps (`feature_info`) selected by `indices` (None: all; n: the last n; a list of
        stage indices), as timm: `(forward_features(x), [maps])`, or only the list."""
        info = self.feature_info
        take = feature_take_indices(len(info), indices)
        captured: dict[int, tuple[torch.Tensor, int]] = {}

        def hook(i: int):
            def save(module, inputs, out):
                if i not in captured:  # the first call of the module is the stage's
                    out = torch.cat(list(out), 1) if isinstance(out, (list, tuple)) else out
                    captured[i] = (out, out._version)
            return save

        handles = [self.get_submodule(info[i]["module"]).register_forward_hook(hook(i)) for i in take]
        try:
            final = self.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        maps = []
        for i in take:
            out, version = captured[i]
            if out._version != version:  # a declaration error: the map was overwritten by an in-place op
                raise RuntimeError(f"{type(self).__name__}: stage {info[i]['module']!r} is modified in place "
                                   "later in the forward pass; declare another module as the stage")
            maps.append(out)
        return maps if intermediates_only else (final, maps)

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier (and new auxiliary classifiers) for `num_classes` outputs, freshly initialised;
        0 replaces the classifier by the identity, so `forward` returns the pooled features."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be an int >= 0, got {num_classes!r}")
        for path in [self.classifier_name, *self.aux_classifier_names()]:
            old = self.get_submodule(path)
            if num_classes == 0:
                if path == self.classifier_name:
                    _set_submodule(self, path, nn.Identity())
                continue  # auxiliary heads run in training only; a features-only net never calls them
            _set_submodule(self, path, self.new_classifier(old, num_classes))
        self.num_classes = num_classes
        self.default_cfg = dict(self.default_cfg, num_classes=num_classes)

    def checkpoint_units(self) -> list[nn.Module]:
        """The modules `set_grad_checkpointing` recomputes: the blocks that make up each stage (the
        children, with parameters, of the container a stage's module sits in, or of the stage itself)."""
        units: list[nn.Module] = []
        for name, _, _ in self.stage_specs():
            module = self.get_submodule(name)
            parent_name = name.rpartition(".")[0]
            parent = self.get_submodule(parent_name) if parent_name else self
            if parent is not self and isinstance(parent, _CONTAINERS):
                candidates = list(parent.children())
            elif isinstance(module, _CONTAINERS):
                candidates = list(module.children())
            else:
                candidates = [module]
            units += [c for c in candidates if next(c.parameters(), None) is not None and c not in units]
        nested = {id(m) for u in units for m in u.modules() if m is not u}
        return [u for u in units if id(u) not in nested]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block of every stage: the backward recomputes each block's forward
        instead of keeping its activations (same gradients; buffers such as BatchNorm's running statistics
        are updated once, not again in the recomputation)."""
        for unit in self.checkpoint_units():
            if enable:
                unit.forward = functools.partial(_checkpointed_forward, unit)
            elif "forward" in unit.__dict__:
                del unit.forward
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class FeatureExtractor(nn.Module):
    """A network's stage feature maps as a list, timm's `features_only=True`: `create(name,
    features_only=True, out_indices=(1, 2, 3))`. The classifier is removed; `feature_info` lists the
    selected stages."""

    def __init__(self, model: Classifier, out_indices: int | Sequence[int] | None = None):
        super().__init__()
        self.out_indices = feature_take_indices(len(model.feature_info), out_indices)
        model.reset_classifier(0)
        self.model = model
        self.default_cfg = model.default_cfg
        self.in_chans = model.in_chans

    @property
    def feature_info(self) -> FeatureInfo:
        info = self.model.feature_info
        return FeatureInfo(info[i] for i in self.out_indices)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)
