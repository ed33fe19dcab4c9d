"""The README's main job: generate a small image set, pretrain with cpu-tiny, evaluate.

Runs on the CPU in about a minute with no server. It prints the progress of training
and then kNN / linear-probe top-1 of the trained backbone against the same network at
random initialisation, so the user sees that the features learned something.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from swav_core.checkpoint import load_model
from swav_core.cli import ProgressBar, console
from swav_core.config import config_from
from swav_core.evaluate import evaluate_model
from swav_core.model import SwAVModel
from swav_core.synthetic import write_shapes_dataset
from swav_core.trainer import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swav-demo")
    parser.add_argument("--out", type=Path, default=Path("var/demo"))
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)

    shutil.rmtree(args.out, ignore_errors=True)
    data_dir = write_shapes_dataset(args.out / "data", per_class=64, size=40)
    overrides = {"epochs": args.epochs} if args.epochs else {}
    config = config_from("cpu-tiny", **overrides)
    console.print(f"dataset: {data_dir} (4 shape classes x 64 images); preset cpu-tiny")

    result = train(config, data_dir, args.out / "run", callbacks=[ProgressBar()])
    console.print(
        f"{result.status}: step {result.step}/{result.total_steps}, "
        f"loss {result.loss:.4f}, checkpoint {result.checkpoint.path if result.checkpoint else '-'}"
    )

    torch.manual_seed(config.seed)
    untrained = SwAVModel.from_config(config)
    report = {
        "trained": evaluate_model(_final_model(args.out), data_dir, size=config.size_crops[0]),
        "random_init": evaluate_model(untrained, data_dir, size=config.size_crops[0]),
    }
    print(json.dumps(report, indent=2))
    return 0


def _final_model(out: Path) -> SwAVModel:
    model, _ = load_model(out / "run" / "checkpoints" / "final.pt")
    return model


if __name__ == "__main__":
    sys.exit(main())
