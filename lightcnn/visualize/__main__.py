"""`python -m lightcnn.visualize [MODEL] [--checkpoint CKPT] [--images ...] [--layers ...] [--what ...]`.

Pictures of what a network has learnt (Zeiler & Fergus 2014), written as PNGs into --out:
filters.png, maps_LAYER.png, deconv_LAYER.png, occlusion_I.png, receptive_fields.png (+ .md, printed),
invariance.png, gradcam.png (Grad-CAM and guided Grad-CAM), guided_backprop.png,
effective_receptive_fields.png (Luo et al. 2016; any network), and evolution.png (from --snapshots
saved by lightcnn.visualize.FeatureSnapshots). A checkpoint with NaN/Inf weights is an error (exit 2).

    python -m lightcnn.visualize lenet5 --checkpoint runs/lenet5_digits/RUN/checkpoints/last.ckpt
    python -m lightcnn.visualize zfnet --images sklearn:china.jpg photo.jpg --layers relu1 relu5 --what deconv rf
    python -m lightcnn.visualize lenet5 --what evolution --snapshots runs/lenet5_digits/RUN/snapshots
    python -m lightcnn.visualize resnet20 --checkpoint r20.ckpt --what gradcam guided erf
    python -m lightcnn.visualize alexnet --list-layers
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from lightcnn.visualize.api import (
    CHAIN_ONLY,
    WHAT,
    default_layers,
    feature_evolution,
    snapshot_files,
    visualize,
)
from lightcnn.visualize.core import load_images, load_model, trace_chain
from lightcnn.visualize.names import paper_names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightcnn.visualize", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write pictures of what a network has learnt (Zeiler & Fergus 2014): deconvnet "
                    "projections, first-layer filters, feature maps, occlusion sensitivity, receptive "
                    "fields (analytic and empirical), invariance curves, Grad-CAM, guided backpropagation, "
                    "feature evolution during training.",
        epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("model", nargs="?", help="registered model name (lightcnn.models.list_models()); "
                   "may be left out when --checkpoint is a lightcnn.fit checkpoint")
    p.add_argument("--checkpoint", help="a .ckpt of lightcnn.fit, a FeatureSnapshots .pt or a state_dict; "
                   "without it the network is randomly initialised")
    p.add_argument("--images", nargs="+", help="image files, or sklearn:china.jpg, sklearn:flower.jpg, "
                   "digits:N (default: 4 digits for a digits model, the two scikit-learn photographs otherwise)")
    p.add_argument("--layers", nargs="+", help="module names (model.named_modules(), a unique suffix such as "
                   "conv5, or the paper's name such as LeNet-5's C3); default: the non-linearity after each "
                   "convolution; Grad-CAM uses the last one (default: the last spatial stage)")
    p.add_argument("--what", nargs="+", default=None, choices=WHAT + ("evolution",),
                   help="pictures to write (default: all but evolution; evolution needs --snapshots)")
    p.add_argument("--snapshots", nargs="+", help="a folder of FeatureSnapshots or checkpoint files, for evolution")
    p.add_argument("--out", default="visualize", help="output folder (default: %(default)s)")
    p.add_argument("--top", type=int, default=9, help="strongest units projected per layer (default: 9)")
    p.add_argument("--maps", type=int, default=4, help="feature maps per layer in the evolution picture")
    p.add_argument("--occlusion-size", type=int, help="side of the grey square (default: 1/6 of the image)")
    p.add_argument("--occlusion-stride", type=int, help="step of the grey square (default: a quarter of its side)")
    p.add_argument("--input-size", type=int, help="image side fed to the network (default: the model's own)")
    p.add_argument("--num-classes", type=int, help="classes of a randomly initialised network")
    p.add_argument("--list-layers", action="store_true", help="print the layers and their output shapes, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with torch.no_grad():  # not set_grad_enabled: an in-process caller keeps its autograd
            return _run(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"lightcnn.visualize: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.model is None and args.checkpoint is None:
        raise ValueError("give a model name or a --checkpoint of lightcnn.fit (see --help)")
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    first = snapshot_files(args.snapshots)[-1] if args.snapshots and not args.checkpoint else args.checkpoint
    model = load_model(args.model, first, **overrides)
    name = args.model or type(model).__name__
    sources = args.images or (["digits:0", "digits:1", "digits:2", "digits:3"]
                              if model.default_cfg.get("dataset") == "digits" else
                              ["sklearn:china.jpg", "sklearn:flower.jpg"])
    x, labels = load_images(sources, model, args.input_size)
    if args.list_layers:
        chain = trace_chain(model, x[:1])
        papers = paper_names(model)
        for u in chain.units:
            flag = "" if u.chained else "  (not in the plain chain: no deconvnet)"
            paper = papers.get(u.name, "")
            print(f"{u.name:32s} {paper:22s} {type(u.module).__name__:20s} {tuple(u.output.shape[1:])}{flag}")
        return 0
    what = list(args.what) if args.what else list(WHAT)
    if not args.what:  # all that applies: the deconvnet and RF arithmetic need a plain chain
        chain = trace_chain(model, x[:1])
        if chain.broken_at is not None and not args.layers:
            skip = list(CHAIN_ONLY) + ([] if default_layers(chain) else ["maps", "invariance"])
            what = [w for w in what if w not in skip]
            print(f"note: {name} is no plain conv/ReLU/pool chain (from {chain.broken_at}): no "
                  f"{', '.join(skip)} (give --layers for maps and invariance); the empirical receptive field "
                  f"(erf), Grad-CAM and guided backpropagation work for any network")
        if importlib.util.find_spec("captum") is None:
            what = [w for w in what if w not in ("gradcam", "guided")]
            print("note: Captum is not installed (pip install captum): no Grad-CAM or guided backpropagation")
    pictures = [w for w in what if w != "evolution"]
    written = []
    if pictures:
        layers_needed = args.layers
        for paths in visualize(model, x, args.out, labels=labels, layers=layers_needed, what=pictures,
                               top=args.top, occlusion_size=args.occlusion_size,
                               occlusion_stride=args.occlusion_stride, title=name).values():
            written += paths
    if "evolution" in what:
        if not args.snapshots:
            raise ValueError("--what evolution needs --snapshots (a folder written by "
                             "lightcnn.visualize.FeatureSnapshots, or checkpoint files)")
        written.append(feature_evolution(args.model, args.snapshots, x, args.out, args.layers, maps=args.maps,
                                         **overrides))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
