"""Benchmark of the CIFAR data pipelines: `batched` (the set as one uint8 tensor on the training device,
augmented a batch at a time: lightcnn/data/batched.py) against `torchvision` (per-image v2 transforms in
DataLoader workers).

It writes a CIFAR-10-format set of 50,000 random training images (and 10,000 test images) in the
official pickle layout to a temporary folder (or --root), then measures:

  pipeline   images/s over one training epoch of each pipeline, as a training step receives them
             (float32 NCHW, normalised, pad-4 crop + flip with --padding-mode and --cutout), on one
             thread: batched in the training process, torchvision with 0 workers and with --workers.
             Median of --rounds epochs, the pipelines alternating.
  fit        a one-epoch `Trainer.fit` of resnet20 with each pipeline (limited to --fit-batches batches
             of 128; --fit-batches 0 runs the whole epoch): seconds per training batch after the first
             two, torchvision with --workers workers.
  gpu        (--device cuda) ResNet-20 and ResNet-110 training steps in bf16 autocast, channels-last, SGD,
             fed by the batched pipeline (loader, crop, flip, normalisation on the GPU) against the same
             step on one batch already in GPU memory. Imports neither jsonargparse nor wandb.

Targets (issue "CIFAR at device speed"): batched >= 50,000 images/s on one core and >= 10x the
torchvision pipeline per core (0 workers, one thread); the resnet20 epoch no slower with batched than
with torchvision; on a GPU, the fed step at >= 90% of the resident-batch rate for both networks.

  python benchmarks/bench_data.py                        # pipelines and the resnet20 fit, on the CPU
  python benchmarks/bench_data.py --skip-fit --rounds 5  # the pipelines only
  python benchmarks/bench_data.py --device cuda --gpu-only --json out.json   # the GPU steps (gpu_check.sh)
"""
from __future__ import annotations

import argparse
import itertools
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import _sync, check  # noqa: E402


def write_cifar10(root: Path, n_train: int = 50_000, n_test: int = 10_000, seed: int = 0) -> Path:
    """A CIFAR-10 set of random images in the official python format (5 training batches, 1 test batch)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)]
    for name, n in [*((f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)), ("test_batch", n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, n).tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def _datamodule(root: Path, pipeline: str, args, workers: int = 0):
    from lightcnn.data import CIFAR10DataModule

    dm = CIFAR10DataModule(root=str(root), batch_size=args.batch_size, verify_md5=False, pipeline=pipeline,
                           padding_mode=args.padding_mode, cutout=args.cutout, num_workers=workers)
    dm.setup("fit")
    return dm


def epoch_images_per_second(dm, pipeline: str, epoch: int) -> float:
    """Images/s of one training epoch, each batch made into the tensor a training step receives."""
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    n, start = 0, time.perf_counter()
    for batch in loader:
        x, y = dm.materialise(batch) if pipeline == "batched" else batch
        n += len(y)
    return n / (time.perf_counter() - start)


def bench_pipelines(root: Path, args) -> dict:
    torch.set_num_threads(1)
    dms = {"batched": _datamodule(root, "batched", args), "torchvision": _datamodule(root, "torchvision", args)}
    if args.workers:
        dms[f"torchvision_{args.workers}w"] = _datamodule(root, "torchvision", args, args.workers)
    rates: dict[str, list[float]] = {name: [] for name in dms}
    for r in range(args.rounds):
        for name, dm in dms.items():
            rates[name].append(epoch_images_per_second(dm, name.split("_")[0], r))
    return {name: statistics.median(v) for name, v in rates.items()}


def bench_fit(root: Path, args) -> dict:
    """Seconds per training batch of a resnet20 `Trainer.fit` epoch with each pipeline."""
    import lightning as L

    from lightcnn.training.module import ClassifierModule

    class Clock(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, *args, **kwargs):
            self.times.append(time.perf_counter())

    torch.set_num_threads(args.threads)
    out = {}
    for pipeline in ("batched", "torchvision"):
        dm = _datamodule(root, pipeline, args, workers=0 if pipeline == "batched" else args.workers)
        clock = Clock()
        module = ClassifierModule("resnet20", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), num_classes=10)
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=args.fit_batches or 1.0,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
        trainer.fit(module, datamodule=dm)
        steps = np.diff(clock.times[1:])  # from the end of the 2nd batch: no first-batch start-up costs
        out[pipeline] = float(np.median(steps))
    return out


def bench_gpu(root: Path, args) -> dict:
    """ResNet-20/110 bf16 channels-last training steps: fed by the batched pipeline vs a resident batch."""
    from lightcnn.data.batched import BatchAugment, EpochBatches, ImageSet
    from lightcnn.data.cifar import CIFAR10Dataset
    from lightcnn.models import create

    device = torch.device(args.device)
    ds = CIFAR10Dataset(str(root), train=True, verify_md5=False)
    images = ImageSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.as_tensor(ds.targets), mirror=True)
    images.to(device)
    augment = BatchAugment((0.49, 0.48, 0.45), (0.25, 0.24, 0.26), padding_mode=args.padding_mode,
                           cutout=args.cutout)
    sampler = EpochBatches(len(images), args.batch_size, shuffle=True, augment=augment)
    out = {}
    for name in ("resnet20", "resnet110"):
        net = create(name, num_classes=10).to(device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        epoch = itertools.cycle(list(sampler))  # an epoch's order, drawn once (real runs: once per 391 steps)

        def fed(n):
            for _ in range(n):
                index, params = next(epoch)
                index, params = index.to(device, non_blocking=True), params.to(device, non_blocking=True)
                x = augment.normalise(augment.crop_flip(images, index, params), params, channels_last=True)
                step(x, images.labels.index_select(0, index.to(device)))

        index, params = next(iter(sampler))
        x0 = augment.normalise(augment.crop_flip(images, index.to(device), params.to(device)), params.to(device),
                               channels_last=True)
        y0 = images.labels.index_select(0, index.to(device))

        def resident(n):
            for _ in range(n):
                step(x0, y0)

        rates = {"fed": [], "resident": []}
        fed(5), resident(5)
        for _ in range(args.rounds):
            for label, fn in (("fed", fed), ("resident", resident)):
                _sync(args.device)
                t = time.perf_counter()
                fn(args.gpu_steps)
                _sync(args.device)
                rates[label].append(args.gpu_steps * args.batch_size / (time.perf_counter() - t))
        out[name] = {k: statistics.median(v) for k, v in rates.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="folder for the CIFAR-format set (default: a temporary folder)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--padding-mode", default="zero", choices=["zero", "mean", "reflect"])
    p.add_argument("--cutout", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="epochs per pipeline (median)")
    p.add_argument("--workers", type=int, default=2, help="torchvision loader workers (besides the 0-worker run)")
    p.add_argument("--skip-fit", action="store_true", help="no resnet20 fit")
    p.add_argument("--skip-pipelines", action="store_true", help="no pipeline epochs (only the fit / GPU steps)")
    p.add_argument("--fit-batches", type=int, default=30, help="training batches of the resnet20 fit (0: all)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the resnet20 fit")
    p.add_argument("--device", default="cpu", help="cuda: also the GPU training steps")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU training steps")
    p.add_argument("--gpu-steps", type=int, default=50, help="training steps per timed GPU round")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if not (root / "cifar-10-batches-py" / "test_batch").is_file():
            write_cifar10(root)
        results, lines = {"args": {k: str(v) for k, v in vars(args).items()}}, []
        if not args.gpu_only and not args.skip_pipelines:
            rates = bench_pipelines(root, args)
            results["images_per_second"] = rates
            print(f"pipelines, one thread, batch {args.batch_size}, padding {args.padding_mode}, cutout "
                  f"{args.cutout}, median of {args.rounds} epochs of 50,000 images:")
            for name, rate in rates.items():
                print(f"  {name:16s} {rate:10.0f} images/s")
            ratio = rates["batched"] / rates["torchvision"]
            lines += [check("batched images/s on one core (thousands)", rates["batched"] / 1000, ">=", 50),
                      check("batched / torchvision per core", ratio, ">=", 10)]
        if not args.gpu_only and not args.skip_fit:
            fit = bench_fit(root, args)
            results["fit_seconds_per_batch"] = fit
            figures = "  ".join(f"{k} {v * 1000:.0f} ms/batch" for k, v in fit.items())
            print(f"resnet20 Trainer.fit, {args.threads} threads, torchvision with {args.workers} workers, "
                  f"{args.fit_batches or 'all'} batches: {figures}")
            lines.append(check("resnet20 epoch time torchvision / batched", fit["torchvision"] / fit["batched"], ">=",
                               1.0))
        if args.device.startswith("cuda") or args.gpu_only:
            gpu = bench_gpu(root, args)
            results["gpu_images_per_second"] = gpu
            name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
            print(f"GPU bf16 channels-last training steps, batch {args.batch_size} ({name}):")
            for name, r in gpu.items():
                print(f"  {name:10s} fed by the batched pipeline {r['fed']:9.0f} images/s, resident batch "
                      f"{r['resident']:9.0f} images/s")
                lines.append(check(f"{name} fed / resident-batch step rate", r["fed"] / r["resident"], ">=", 0.9))
        print("Targets:")
        print("\n".join(lines))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
