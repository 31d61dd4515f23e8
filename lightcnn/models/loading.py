"""The network of a checkpoint: `load_model(name, checkpoint)`, in eval mode.

    from lightcnn.models import load_model
    model = load_model(None, "runs/lenet5_digits/RUN/checkpoints/last.ckpt")   # name and settings from the file
    model = load_model("lenet5", "snapshots/epoch=0002.pt")                     # a snapshot or a plain state_dict

The checkpoint's checksum is verified first (`lightcnn.training.checkpoint`); weights holding NaN or Inf are
refused (`check_finite`).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from lightcnn.models.registry import create


def _read(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (give a .ckpt of lightcnn.fit, a "
                                f"snapshot .pt of FeatureSnapshots, or a saved state_dict)")
    from lightcnn.training.checkpoint import verify_checkpoint  # Lightning only when a file is read

    verify_checkpoint(path)  # a damaged file is one line naming the intact checkpoints beside it
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a Lightning checkpoint may hold objects beyond tensors: load it as Lightning does
        return torch.load(path, map_location="cpu", weights_only=False)


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if any(
        k.startswith(prefix) for k in state) else state


def load_model(name: str | None, checkpoint: str | Path | None = None, **overrides) -> nn.Module:
    """The registered network `name` in eval mode, with the weights of `checkpoint` if given.

    `checkpoint` is a Lightning checkpoint of `lightcnn.fit` (its `ClassifierModule` keeps the network at
    `.net`; the model name, class count, input channels and model_kwargs are read from its
    hyper-parameters, so `name` may be None), a snapshot of `FeatureSnapshots` (same layout), or a plain
    state_dict of the network. `overrides` go to `lightcnn.models.create` (e.g. `num_classes=10`)."""
    state, hp, run_eval = None, {}, {}
    if checkpoint is not None:
        ckpt = _read(checkpoint)
        if not isinstance(ckpt, dict):
            raise ValueError(f"checkpoint {str(checkpoint)!r} holds a {type(ckpt).__name__}, not a state_dict")
        if "state_dict" in ckpt:
            state, hp = ckpt["state_dict"], dict(ckpt.get("hyper_parameters") or {})
            run_eval = dict((ckpt.get("lightcnn") or {}).get("eval") or {})
        else:
            state = ckpt
        state = _strip(_strip(state, "net."), "_orig_mod.")
        saved = hp.get("model")
        if name is None:
            name = saved
        elif saved is not None and saved != name:
            raise ValueError(f"checkpoint {str(checkpoint)!r} was trained as {saved!r}, not {name!r}: "
                             f"give the model name {saved!r} (or none)")
    if name is None:
        raise ValueError("give a model name (lightcnn.models.list_models()) or a checkpoint of lightcnn.fit")
    kwargs = dict(hp.get("model_kwargs") or {})
    for key in ("num_classes", "in_chans"):  # not `impl`: a run's choice of kernels need not suit this machine
        if hp.get(key) is not None:
            kwargs[key] = hp[key]
    kwargs.update(overrides)
    model = create(name, **kwargs)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            # a plain state_dict of a network trained for another class count: the classifier's rows say
            last = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
            n = state[last[-1]].shape[0] if last else None
            if "num_classes" in kwargs or n is None or n == getattr(model, "num_classes", n):
                raise ValueError(f"checkpoint {str(checkpoint)!r} does not fit {name!r} "
                                 f"(another model or other settings?): {e}") from None
            return load_model(name, checkpoint, **{**overrides, "num_classes": n})
        check_finite(model, f"checkpoint {str(checkpoint)!r}")
    model.default_cfg = with_run_eval(model.default_cfg, run_eval)
    return model.eval()


def with_run_eval(default_cfg: dict, run_eval: dict) -> dict:
    """The network's `default_cfg` with the input size and normalisation its run evaluated with (saved by
    `lightcnn.fit` in the checkpoint), so that images are fed as the run was, e.g. at 112 px, not 224."""
    cfg = dict(default_cfg)
    size = run_eval.get("image_size")
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
        cfg["input_size"] = (cfg["input_size"][0], int(h), int(w))
    for key in ("mean", "std"):
        if run_eval.get(key) is not None:
            cfg[key] = tuple(run_eval[key])
    return cfg


def check_finite(model: nn.Module, what: str) -> None:
    """A ValueError when a parameter or buffer of `model` holds NaN or Inf (a diverged run's weights give
    blank pictures, not an insight), naming the tensors."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        total = sum(1 for v in model.state_dict().values() if v.is_floating_point())
        raise ValueError(f"{what} holds NaN or Inf in {len(bad)} of {total} weight tensors ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the run diverged; pick a checkpoint from before")
