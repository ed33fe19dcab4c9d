"""Command line: `swav-train`, `swav-embed`, `swav-eval`.

User mistakes (bad config, missing folder, unreadable checkpoint) print one line and
exit 2; no traceback. A run stopped with Ctrl-C checkpoints first and exits 130.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: idle compute threads sleep instead of spinning, so the data
# loader workers get the cores they need (bench/train_throughput.py: 15.6 -> 19.2 img/s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import signal
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from swav_core.checkpoint import load_latest_checkpoint
from swav_core.config import TrainConfig
from swav_core.config_parsing import parse_duration, parse_settings
from swav_core.costs import estimate, measure_machine
from swav_core.embed import embed
from swav_core.errors import SwavError
from swav_core.evaluate import evaluate_model
from swav_core.export_formats import export_formats
from swav_core.exports import load_model, write_export
from swav_core.image_folder import scan_image_folder
from swav_core.images import load_rgb
from swav_core.model import SwAVModel
from swav_core.onnx_export import OnnxExportError
from swav_core.presets import config_from, preset_names
from swav_core.recipe import AUTO, DatasetStats, resolve_config
from swav_core.spawn import StopFile, spawn
from swav_core.trainer import TrainResult, train

console = Console(stderr=True)


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file in JSON or TOML; a `preset` key in it names the preset to start from."""
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise SwavError(f"{path}: expected a table/object of config fields")
    return data


def _fail(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    try:
        return main(argv)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "config"
        return _fail(f"{field}: {first['msg'].removeprefix('Value error, ')}")
    except KeyError as error:
        return _fail(error.args[0] if error.args else error)
    except (SwavError, OSError, json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        return _fail(error)


class ProgressBar:
    """A rich progress bar fed by the trainer's events: step/total, loss, lr, images/s, ETA."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "started":
            self.progress.start()
            self.task = self.progress.add_task(
                "train",
                total=event["total_steps"],
                completed=event["step"],
                epoch=event["epoch"],
                loss="-",
                lr="-",
                ips="-",
            )
        elif kind == "metrics" and self.task is not None:
            self.progress.update(
                self.task,
                completed=event["step"],
                epoch=event["epoch"],
                loss=f"{event['loss']:.4f}",
                lr=f"{event['lr']:.3g}",
                ips=f"{event['images_per_s']:.1f}",
            )
        elif kind in ("budget_fitted", "budget_refitted") and self.task is not None:
            self.progress.update(self.task, total=event["total_steps"])
        elif kind == "dataset" and event["num_skipped"]:
            console.print(f"skipped {event['num_skipped']} files: {event['skip_reasons']}")
        elif kind in ("warning",):
            console.print(f"[yellow]warning:[/] {event['message']}")
        elif kind in ("stopped", "finished"):
            self.progress.stop()


def _train(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="swav-train", description="Pretrain SwAV on a folder.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="JSON or TOML file of TrainConfig fields")
    source.add_argument(
        "--preset",
        choices=[AUTO, *preset_names()],
        help="auto (the default) chooses from the data, this machine and --budget",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a TrainConfig field, repeatable: epochs=20, size_crops=32,24, precision=bf16",
    )
    parser.add_argument(
        "--budget", type=duration_argument, help="wall time instead of epochs: 1200, 20m, 1h30m"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and estimate, no run"
    )
    parser.add_argument("--data", type=Path, required=True, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (gloo/NCCL)")
    parser.add_argument(
        "--start-weights",
        type=Path,
        help="start a fresh run from these weights: a checkpoint (.pt), a model export, or a "
        "backbone state dict (.safetensors, e.g. torchvision's); ignored on --resume",
    )
    args = parser.parse_args(argv)

    fields: dict[str, Any] = read_config_file(args.config) if args.config else {}
    preset = fields.pop("preset", None) or args.preset or AUTO
    overrides = {**fields, **parse_settings(args.set)}
    if args.budget is not None:
        overrides["budget_s"] = args.budget
    saved = load_latest_checkpoint(args.out) if args.resume else None
    reasons: dict[str, str]
    if saved is not None and preset == AUTO:  # auto chose once; the checkpoint holds it
        config, reasons, estimate_ = TrainConfig.model_validate(saved[0]["config"]), {}, None
    else:
        config, reasons, estimate_ = _resolve(preset, overrides, args.data, args.nproc)
    if args.dry_run:
        print(json.dumps({"config": config.model_dump(mode="json"), "reasons": reasons,
                          "estimate": estimate_}, indent=2))
        return 0
    for name, why in reasons.items():
        console.print(f"[dim]auto: {name} = {getattr(config, name)!r}: {why}[/]")
    if not args.resume and any((args.out / "checkpoints").glob("*.pt")):
        raise SwavError(f"{args.out} already holds checkpoints: pass --resume or another --out")

    stop_requested = False
    stop_file = args.out / "STOP"
    stop_file.unlink(missing_ok=True)

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        if args.nproc > 1:
            result_dict = spawn(
                config,
                args.data,
                args.out,
                args.nproc,
                resume=args.resume,
                should_stop=StopFile(stop_file),
                start_weights=args.start_weights,
            )
            status = result_dict["status"]
        else:
            result: TrainResult = train(
                config,
                args.data,
                args.out,
                callbacks=[ProgressBar()],
                should_stop=lambda: stop_requested,
                resume=args.resume,
                start_weights=args.start_weights,
            )
            status = result.status
    finally:
        signal.signal(signal.SIGINT, previous)
    if status == "stopped":
        console.print(f"stopped; resume with: swav-train ... --out {args.out} --resume")
        return 130
    model, _ = load_model(args.out / "checkpoints" / "final.pt")
    written = write_exports(model, config, args.out)
    console.print(
        f"done: {args.out / 'checkpoints' / 'final.pt'}, {', '.join(map(str, written))}"
    )
    return 0


OUT_NAMES = {
    "safetensors": "model.safetensors",
    "backbone": "backbone.safetensors",
    "timm": "backbone.timm.safetensors",
    "onnx": "backbone.onnx",
}
"""The exports `swav-train` writes into --out, by format (those that apply to the backbone)."""


def write_exports(model: SwAVModel, config: TrainConfig, out: Path) -> list[Path]:
    """Every export that applies to the model's backbone, in `out`; an ONNX export torch
    cannot make is reported and skipped (the weights exports still load)."""
    written = []
    for fmt in export_formats(config.backbone):
        if fmt in OUT_NAMES:
            try:
                write_export(model, config, fmt, out / OUT_NAMES[fmt])
            except OnnxExportError as exc:
                console.print(f"warning: no ONNX export: {exc}", markup=False)
                continue
            written.append(out / OUT_NAMES[fmt])
    return written


def duration_argument(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _resolve(
    preset: str, overrides: dict[str, Any], data: Path, ranks: int
) -> tuple[TrainConfig, dict[str, str], dict[str, Any] | None]:
    """The run's config, the reasons of auto's choices and, for auto, the estimate."""
    if preset != AUTO:
        return config_from(preset, **overrides), {}, None
    scan = scan_image_folder(data)
    machine = measure_machine()
    stats = DatasetStats.from_scan(scan)
    config, reasons = resolve_config(preset, overrides, stats, machine, ranks)
    cost = estimate(config, len(scan.files), machine, ranks, stats.median_short_side**2)
    return config, reasons, {**cost.as_dict(), "machine_gflops": machine.gflops}


def image_paths(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; folders expanded to their readable images in sorted order."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            scan = scan_image_folder(item)
            paths.extend(item / name for name in scan.files)
        elif item.exists():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return paths


def _embed(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="swav-embed", description="Embed images with a model.")
    parser.add_argument("--checkpoint", type=Path, required=True, help=".pt or .safetensors")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--out", type=Path, required=True, help="output .npy (N x D float32)")
    parser.add_argument("--layer", choices=["backbone", "projection"], default="backbone")
    parser.add_argument("--no-normalize", action="store_true")
    parser.add_argument("--size", type=int, help="input side; default the config's largest crop")
    args = parser.parse_args(argv)

    model, config = load_model(args.checkpoint)
    paths = image_paths(args.images)
    features = embed(
        model,
        [load_rgb(p) for p in paths],
        layer=args.layer,
        normalize=not args.no_normalize,
        size=args.size or config.size_crops[0],
    )
    np.save(args.out, features.numpy())
    args.out.with_suffix(".txt").write_text("".join(f"{p}\n" for p in paths))
    console.print(f"{len(paths)} embeddings of dim {features.shape[1]} -> {args.out}")
    return 0


def _eval(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="swav-eval", description="kNN and linear-probe top-1.")
    parser.add_argument("--checkpoint", type=Path, required=True, help=".pt or .safetensors")
    parser.add_argument("--data", type=Path, required=True, help="folder with class subfolders")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--size", type=int)
    args = parser.parse_args(argv)

    model, config = load_model(args.checkpoint)
    report = evaluate_model(
        model, args.data, size=args.size or config.size_crops[0], val_fraction=args.val_fraction
    )
    print(json.dumps(report))
    return 0


def train_main(argv: list[str] | None = None) -> int:
    return _run_cli(_train, argv)


def embed_main(argv: list[str] | None = None) -> int:
    return _run_cli(_embed, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return _run_cli(_eval, argv)


if __name__ == "__main__":
    sys.exit(train_main())
