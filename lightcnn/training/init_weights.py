"""Starting weights for a network from a file: `--model.init_weights PATH` of `ClassifierModule`.

Accepted files (read on the CPU with `torch.load`):
- a lightcnn checkpoint (`RUN/checkpoints/last.ckpt`): its `state_dict` without the module's `net.` prefix;
- a lightcnn state_dict (`torch.save(model.state_dict(), PATH)`, with or without the `net.` prefix);
- a torchvision or timm state_dict of a twin architecture (`lightcnn.models.weights.twins("torchvision")`),
  converted by the twin registry (`weights.py`), e.g. torchvision's `resnet50-0676ba61.pth`.

When only the classifier's shape differs (another class count), the classifier stays freshly initialised
(fine-tuning); any other key that does not fit is a ValueError listing the keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightcnn.models.weights import TWINS
from lightcnn.training.checkpoint import verify_checkpoint

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint or state_dict file, unwrapped and without `net.`/`module.` prefixes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"init_weights: no file {path!r}")
    verify_checkpoint(path)  # a damaged lightcnn checkpoint is one line naming the intact ones beside it
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)  # a file the user chose to trust
    except Exception as e:
        raise ValueError(f"init_weights: {path} is not a file torch.load can read ({e})") from e
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise ValueError(f"init_weights: {path} holds no state_dict (keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"init_weights: {path} holds a {type(obj).__name__}, not a state_dict")
    sd = dict(obj)
    for prefix in ("net.", "module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def twin_libraries(model_name: str, sd: Mapping[str, torch.Tensor], net_keys: set[str]) -> list[str]:
    """The libraries whose twin of `model_name` may have written `sd` (empty when `sd` is lightcnn's layout)."""
    if len(set(sd) & net_keys) > len(sd) // 2:
        return []
    return [library for library, name in TWINS if name == model_name]


def load_init_weights(net: nn.Module, model_name: str, sd: dict[str, torch.Tensor], path: str) -> None:
    """Load `sd` (lightcnn's or a twin's layout) into `net`, keeping a fresh classifier where the class count
    differs. Raises a ValueError listing the keys that do not fit."""
    ours = net.state_dict()
    libraries, twin, errors = twin_libraries(model_name, sd, set(ours)), None, []
    for library in libraries:
        try:
            sd, twin = dict(TWINS[(library, model_name)].convert(net, sd)), library
            break
        except ValueError as e:
            errors.append(f"as {library}'s: {e}")
    if libraries and twin is None:
        raise ValueError(f"init_weights: {path} is not lightcnn's {model_name} and does not convert "
                         + "; ".join(errors))
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    mismatched = sorted(k for k in set(ours) & set(sd) if ours[k].shape != sd[k].shape)
    num_classes = getattr(net, "num_classes", None)
    # A classifier of another class count: its tensors differ only in their first dimension, the class count.
    head = [k for k in mismatched if ours[k].dim() >= 1 and ours[k].shape[0] == num_classes
            and ours[k].shape[1:] == sd[k].shape[1:]]
    if missing or unexpected or len(head) != len(mismatched):
        shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(ours[k].shape)}" for k in mismatched if k not in head]
        problems = [f"missing {_few(missing)}" if missing else "",
                    f"unexpected {_few(unexpected)}" if unexpected else "",
                    f"shape mismatch (theirs vs ours) {_few(shapes)}" if shapes else ""]
        raise ValueError(f"init_weights: {path} does not fit {model_name}: "
                         + "; ".join(p for p in problems if p)
                         + ". Is it this architecture (same model and model_kwargs)?")
    for k in head:
        sd[k] = ours[k]  # the fresh classifier
    net.load_state_dict(sd)
    note = f"; fresh classifier for {num_classes} classes ({', '.join(head)})" if head else ""
    rank_zero_info(f"lightcnn: initial weights of {model_name} from {path}"
                   f"{f' ({twin} layout)' if twin else ''}{note}")


def _few(keys: list[str], n: int = 8) -> str:
    return "[" + ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "") + "]"
