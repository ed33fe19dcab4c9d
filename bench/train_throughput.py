"""End-to-end training throughput against the compute bound measured in the same run.

End to end: `swav_core.trainer.train` on a generated folder of JPEG images (decode,
multi-crop, forward, Sinkhorn, loss, backward, optimiser, events). Bound: the same model,
crops and optimiser on pre-made tensors, timed stage by stage (forward, Sinkhorn + loss,
backward + step). The data share is the time to produce one batch with the loader in the
main process. Prints images/s of both, their ratio, the shares and peak RSS.

`--data-path prepared` trains from a prepared copy of the same JPEGs (written before the
clock starts), its crops made in batches (swav_core/prepared_loader.py); `pil` (default)
decodes and crops each image in the loader workers.

`--backbone` takes any name a job may give (`timm/convnext_atto`,
`torchvision/efficientnet_b0`, ...), `--sizes` the two crop sides (a ViT's must be
multiples of its patch).

    .venv/bin/python bench/train_throughput.py [--steps 30] [--precision bf16]
        [--data-path pil|prepared] [--backbone resnet18] [--sizes 96 64]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as swav-train and the worker run it

import argparse  # noqa: E402
import json  # noqa: E402
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from swav_core.config import TrainConfig
from swav_core.data import ShardedEpochSampler
from swav_core.image_folder import scan_image_folder
from swav_core.loss import swav_loss
from swav_core.model import SwAVModel
from swav_core.prepared import write_prepared
from swav_core.prepared_loader import training_images, training_input
from swav_core.presets import config_from
from swav_core.synthetic import SHAPES, shape_image
from swav_core.trainer import autocast_context, train
from swav_core.training_state import build_optimizer


def write_jpegs(root: Path, count: int, size: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / SHAPES[i % len(SHAPES)]
        folder.mkdir(parents=True, exist_ok=True)
        shape_image(SHAPES[i % len(SHAPES)], size, rng).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bench_config(args: argparse.Namespace) -> TrainConfig:
    return config_from(
        None,
        backbone=args.backbone,
        n_crops=(2, 4),
        size_crops=tuple(args.sizes),
        n_prototypes=300,
        batch_size=args.batch,
        epochs=1,
        base_lr=0.6,
        final_lr=0.0006,
        warmup_epochs=0,
        optimizer="lars",
        precision=args.precision,
        num_workers=args.workers,
        queue_length=0,
        checkpoint_every_epochs=0,
        log_every_steps=1,
        seed=0,
    )


def end_to_end(
    config: TrainConfig, data: Path, run: Path, skip: int, prepared: Path | None
) -> float:
    """Images/s of the trainer over its steps after `skip` warm-up steps."""
    stamps: list[float] = []
    paths: list[str] = []

    def record(event: dict[str, Any]) -> None:
        if event["type"] == "metrics":
            stamps.append(time.perf_counter())
        elif event["type"] == "started":
            paths.append(event["data_path"])

    train(config, data, run, callbacks=[record], prepared_dir=prepared)
    assert paths == ["pil" if prepared is None else "prepared"], paths
    intervals = [b - a for a, b in zip(stamps[skip:], stamps[skip + 1 :], strict=False)]
    return config.batch_size / statistics.median(intervals)


def compute_bound(config: TrainConfig, steps: int, skip: int) -> tuple[float, dict[str, float]]:
    """Images/s of model + Sinkhorn + loss + optimiser on pre-made tensors, and stage times."""
    torch.manual_seed(0)
    model = SwAVModel.from_config(config).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    crops = [
        torch.randn(config.batch_size, 3, size, size)
        for count, size in zip(config.n_crops, config.size_crops, strict=True)
        for _ in range(count)
    ]
    autocast = autocast_context(config, torch.device("cpu"))
    stages: dict[str, list[float]] = {"forward": [], "sinkhorn_loss": [], "backward_step": []}
    totals = []
    for i in range(steps):
        t0 = time.perf_counter()
        model.normalize_prototypes()
        with autocast:
            _, scores = model(crops)
        t1 = time.perf_counter()
        loss = swav_loss(
            scores.split(config.batch_size),
            config.temperature,
            config.epsilon,
            config.sinkhorn_iterations,
            config.crops_for_assign,
        )
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t3 = time.perf_counter()
        if i >= skip:
            stages["forward"].append(t1 - t0)
            stages["sinkhorn_loss"].append(t2 - t1)
            stages["backward_step"].append(t3 - t2)
            totals.append(t3 - t0)
    return config.batch_size / statistics.median(totals), {
        k: statistics.median(v) for k, v in stages.items()
    }


def best_bound(args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """The compute bound at its fastest: OpenMP threads spinning (ACTIVE), nothing else running.

    Training sets OMP_WAIT_POLICY=PASSIVE (threads sleep while the loader worker needs
    the core); measuring the bound under that policy too would flatter the ratio.
    """
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    command = [sys.executable, __file__, "--bound-only", "--batch", str(args.batch),
               "--precision", args.precision, "--backbone", args.backbone,
               "--sizes", *map(str, args.sizes)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    bound, stages = json.loads(output.strip().splitlines()[-1])
    return float(bound), dict(stages)


def data_time(config: TrainConfig, data: Path, batches: int, prepared: Path | None) -> float:
    """Seconds to make one batch of crops (decode or read, multi-crop) in the main process."""
    scan = scan_image_folder(data)
    sampler = ShardedEpochSampler(len(scan.files), config.batch_size, 0, 1, config.seed)
    serial = config.model_copy(update={"num_workers": 0})
    source = training_images(serial, data, prepared)
    loader = training_input(serial, source, sampler, torch.device("cpu")).loader
    start = time.perf_counter()
    for i, _ in enumerate(loader):
        if i + 1 == batches:
            break
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--data-path", choices=["pil", "prepared"], default="pil")
    parser.add_argument("--backbone", default="resnet18", help="any name GET /v1/backbones lists")
    parser.add_argument("--sizes", type=int, nargs=2, default=[96, 64], metavar=("LARGE", "SMALL"))
    parser.add_argument("--bound-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = bench_config(args)
    skip = 4
    if args.bound_only:
        print(json.dumps(compute_bound(config, 12, 2)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = write_jpegs(Path(tmp) / "data", args.batch * (args.steps + 1), 128)
        prepared = None
        if args.data_path == "prepared":
            prepared = Path(tmp) / "prepared"
            write_prepared(scan_image_folder(data), prepared)
        bound, stages = best_bound(args)
        e2e = end_to_end(config, data, Path(tmp) / "run", skip, prepared)
        per_batch_data = data_time(config, data, 4, prepared)

    step = sum(stages.values())
    rss_mb = (
        max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        )
        / 1024
    )
    report: dict[str, Any] = {
        "model": f"{config.backbone} {config.n_crops[0]}x{config.size_crops[0]}+"
        f"{config.n_crops[1]}x{config.size_crops[1]} batch {config.batch_size} "
        f"{config.precision}, {torch.get_num_threads()} threads, "
        f"{config.num_workers} loader workers, data path {args.data_path}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        "end_to_end_images_per_s": round(e2e, 2),
        "compute_bound_images_per_s": round(bound, 2),
        "ratio": round(e2e / bound, 3),
        "share_data_if_serial": round(per_batch_data / (per_batch_data + step), 3),
        "share_forward": round(stages["forward"] / step, 3),
        "share_sinkhorn_loss": round(stages["sinkhorn_loss"] / step, 3),
        "share_backward_step": round(stages["backward_step"] / step, 3),
        "peak_rss_mb": round(rss_mb, 1),
    }
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
