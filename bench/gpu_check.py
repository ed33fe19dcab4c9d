"""The engine on a GPU at the paper's scale, in a few minutes, on generated data.

throughput: resnet50 with the paper's multi-crop (2x224 + 6x96) at bf16, trained by
`swav_core.trainer.train` for a few hundred steps on generated JPEGs (the shapes of
swav_core.synthetic at 256 px), once per data path: `pil` (each image decoded and cropped
in the loader workers) and `prepared` (the images' prepared copy read by the workers, the
crops made in batches on the GPU; swav_core/prepared_loader.py). Reports per path the
end-to-end images/s and its ratio to the compute bound (the same model, loss and optimiser
step on tensors already on the device), the GPU busy fraction (nvidia-smi), peak GPU
memory and the loss curve, with --workers loader processes. Fails if a run does not finish
or its loss does not go down.

equivalence: 2 ranks == 1 process, as tests/core/test_trainer.py checks with gloo on the CPU,
here on 2 GPUs over NCCL: a 4-step tiny run's final weights from 2 ranks (global batch
norm, global Sinkhorn) match the single-process run within the test's bound, and per-rank
batch norm (the negative control) does not.

--tiny runs both on the CPU with a tiny model and a few steps (gloo for the equivalence),
to show the script itself works where there is no GPU. bench/gpu_check.sh runs both.

    .venv/bin/python bench/gpu_check.py throughput [--steps 300] [--batch 128] [--out DIR]
    .venv/bin/python bench/gpu_check.py equivalence [--out DIR]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the worker runs training
# cuBLAS is deterministic only with a fixed workspace; read when CUDA starts, so set first.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import json  # noqa: E402
import math
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from swav_core.checkpoint import load_checkpoint
from swav_core.config import TrainConfig
from swav_core.distributed import free_port, set_spawn_env
from swav_core.image_folder import scan_image_folder
from swav_core.model import SwAVModel
from swav_core.prepared import write_prepared
from swav_core.presets import config_from
from swav_core.step import swav_step
from swav_core.synthetic import SHAPES, shape_image, write_shapes_dataset
from swav_core.trainer import autocast_context, train
from swav_core.training_state import build_optimizer

# tests/core/test_trainer.py::test_two_gloo_ranks_match_one_process derives these bounds: at
# lr 0.01 rounding differences between 1 and 2 ranks stay near 5e-5 after 4 steps, while
# per-rank batch norm is off by ~5e-2.
EQUIVALENCE_ATOL = 3e-4
NEGATIVE_CONTROL_MIN = 1e-2

# What --tiny takes from the cpu-tiny preset (its model, crop scales, Sinkhorn and
# optimiser); the paper's crop counts and the run's length stay, the crops are 48/24 px.
_TINY_FIELDS = (
    "backbone",
    "hidden_mlp",
    "feat_dim",
    "n_prototypes",
    "min_scale_crops",
    "max_scale_crops",
    "epsilon",
    "optimizer",
    "base_lr",
    "final_lr",
)


# --- data ----------------------------------------------------------------------------------


def _write_one(job: tuple[Path, int, int]) -> None:
    root, index, size = job
    shape = SHAPES[index % len(SHAPES)]
    image = shape_image(shape, size, np.random.default_rng(index))
    image.save(root / shape / f"{index:05d}.jpg", quality=90)


def write_jpegs(root: Path, count: int, size: int, processes: int) -> Path:
    """`count` shape images of `size` px as JPEGs, one folder per class, in parallel."""
    for shape in SHAPES:
        (root / shape).mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_write_one, [(root, i, size) for i in range(count)], chunksize=16)
    return root


# --- throughput ----------------------------------------------------------------------------


def paper_config(args: argparse.Namespace) -> TrainConfig:
    """The paper's ImageNet model and crops at a per-GPU batch, for a run of a few hundred
    steps: lr of the reference's batch-256 recipe (0.6) scaled linearly to the batch, no
    warm-up, prototypes frozen for the first quarter (the paper: the first epoch)."""
    steps_per_epoch = args.images // args.batch
    lr = 0.6 * args.batch / 256
    overrides: dict[str, Any] = {
        "batch_size": args.batch,
        "epochs": math.ceil(args.steps / steps_per_epoch),
        "base_lr": lr,
        "final_lr": lr / 1000,
        "warmup_epochs": 0,
        "freeze_prototypes": args.steps // 4,
        "precision": args.precision,
        "num_workers": args.workers,
        "checkpoint_every_epochs": 0,
        "log_every_steps": args.log_every,
        "seed": 0,
    }
    if args.tiny:
        tiny = config_from("cpu-tiny")
        overrides |= {key: getattr(tiny, key) for key in _TINY_FIELDS} | {"size_crops": (48, 24)}
    return config_from("imagenet-800ep", **overrides)


def compute_bound(config: TrainConfig, device: torch.device, steps: int, skip: int) -> float:
    """Images/s of the trainer's step (`swav_step`: forward, Sinkhorn + loss), backward and
    optimiser step on tensors already on the device: the trainer's ceiling when data
    loading is free."""
    torch.manual_seed(0)
    model = SwAVModel.from_config(config).to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    crops = [
        torch.randn(config.batch_size, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last
        )
        for count, size in zip(config.n_crops, config.size_crops, strict=True)
        for _ in range(count)
    ]
    autocast = autocast_context(config, device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        model.normalize_prototypes()
        loss = swav_step(model, model.prototypes.weight, crops, None, config, autocast).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return config.batch_size / statistics.median(times[skip:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "cpus": len(os.sched_getaffinity(0)),
    }
    if device.type == "cuda":
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpus": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30),
        }
    return info


class GpuBusy:
    """The fraction of `nvidia-smi` samples (every 0.5 s, while entered) in which the GPU
    was busy (utilization.gpu: the share of the last sample period a kernel ran); None
    without nvidia-smi (a CPU run)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        command = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                   "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.5):
            try:
                answer = subprocess.run(command, capture_output=True, text=True, timeout=5)
                self.samples.append(float(answer.stdout.strip()) / 100)
            except (OSError, ValueError, subprocess.SubprocessError):
                return

    def __enter__(self) -> GpuBusy:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def fraction(self) -> float | None:
        steady = self.samples[len(self.samples) // 5 :]  # past start-up and warm-up
        return round(statistics.mean(steady), 3) if steady else None


def train_one_path(
    config: TrainConfig, data: Path, prepared: Path | None, run: Path, device: torch.device
) -> dict[str, Any]:
    """One training run from the images (PIL) or their prepared copy (batched crops)."""
    metrics: list[dict[str, Any]] = []
    started_events: list[dict[str, Any]] = []

    def record(event: dict[str, Any]) -> None:
        if event["type"] == "metrics":
            metrics.append(event)
        elif event["type"] == "started":
            started_events.append(event)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with GpuBusy(device.index or 0) as busy:
        result = train(config, data, run, device=device, callbacks=[record], prepared_dir=prepared)
    wall = time.perf_counter() - started
    # The first two windows hold cuDNN's autotuning and the loader workers' start.
    rates = [m["images_per_s"] for m in metrics[2:]] or [m["images_per_s"] for m in metrics]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "data_path": started_events[0]["data_path"],
        "result": result,
        "wall_s": round(wall, 1),
        "images_per_s": round(statistics.median(rates), 1),
        "gpu_busy": busy.fraction,
        "peak_gpu_memory_gib": round(peak, 2) if peak is not None else None,
        "curve": [(m["step"], round(m["loss"], 4)) for m in metrics],
    }


def throughput(args: argparse.Namespace, work: Path) -> bool:
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    config = paper_config(args)
    crops = " + ".join(f"{n}x{s}" for n, s in zip(config.n_crops, config.size_crops, strict=True))
    print(f"throughput: {config.backbone}, crops {crops}, batch {config.batch_size}, "
          f"{config.precision}, {config.num_workers} loader workers, {environment(device)}",
          flush=True)

    started = time.perf_counter()
    data = write_jpegs(work / "images", args.images, args.image_size, max(1, args.workers))
    print(f"  {args.images} images of {args.image_size} px written in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    prepared = None
    if "prepared" in args.data_path:
        started = time.perf_counter()
        write_prepared(scan_image_folder(data), work / "prepared")
        prepared = work / "prepared"
        print(f"  prepared copy written in {time.perf_counter() - started:.1f} s", flush=True)

    bound = compute_bound(config, device, steps=args.bound_steps, skip=3)
    print(f"  compute bound: {bound:8.1f} images/s (same step on device tensors)", flush=True)
    report: dict[str, Any] = {
        "config": config.model_dump(mode="json"),
        "environment": environment(device),
        "loader_workers": config.num_workers,
        "compute_bound_images_per_s": round(bound, 1),
        "loss_ln_k": round(math.log(config.n_prototypes), 4),
        "paths": {},
    }
    checks: dict[str, bool] = {}
    for path in args.data_path:
        run = train_one_path(
            config, data, prepared if path == "prepared" else None, work / f"run-{path}", device
        )
        result, curve = run.pop("result"), run["curve"]
        first = statistics.mean(loss for _, loss in curve[:3])
        last = statistics.mean(loss for _, loss in curve[-3:])
        checks[f"{path}_completed"] = (
            result.status == "completed" and result.step == result.total_steps
            and run["data_path"] == path
        )
        checks[f"{path}_loss_decreased"] = last < first
        run["over_bound"] = round(run["images_per_s"] / bound, 3)
        report["paths"][path] = run
        busy = "n/a" if run["gpu_busy"] is None else f"{run['gpu_busy']:.2f}"
        print(f"  {path}: {result.step} steps in {run['wall_s']:.1f} s, "
              f"{run['images_per_s']:8.1f} images/s end to end, {run['over_bound']:.2f} of "
              f"the bound, GPU busy {busy}", flush=True)
        if run["peak_gpu_memory_gib"] is not None:
            print(f"    peak GPU memory: {run['peak_gpu_memory_gib']:.2f} GiB allocated")
        print(f"    loss (ln K = {math.log(config.n_prototypes):.3f}), step: loss")
        for start in range(0, len(curve), 8):
            print("     " + "  ".join(f"{s:>4}: {v:.3f}" for s, v in curve[start : start + 8]))
    report["checks"] = checks
    (args.out / "throughput.json").write_text(json.dumps(report, indent=1))
    print(f"  checks: {checks}", flush=True)
    return all(checks.values())


# --- equivalence ---------------------------------------------------------------------------


def _rank(rank: int, world: int, port: int, config: TrainConfig, data: Path, run: Path,
          device_type: str) -> None:
    """One rank, as trainer._spawned_rank runs it, with deterministic kernels and no TF32
    (the TF32 default of cuDNN convolutions rounds to 10 mantissa bits)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if world > 1:
        set_spawn_env(rank, world, port)
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    train(config, data, run, device=device)


def final_weights(config: TrainConfig, data: Path, run: Path, world: int,
                  device_type: str) -> dict[str, torch.Tensor]:
    mp.start_processes(
        _rank,
        args=(world, free_port(), config, data, run, device_type),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return dict(load_checkpoint(run / "checkpoints" / "final.pt")["model"])


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a if a[n].is_floating_point())


def equivalence(args: argparse.Namespace, work: Path) -> bool:
    device_type = "cpu" if args.tiny else "cuda"
    backend = "gloo" if args.tiny else "nccl"
    if device_type == "cuda" and torch.cuda.device_count() < 2:
        print(f"equivalence: needs 2 GPUs, found {torch.cuda.device_count()}")
        return False
    # tests/conftest.py's shapes and tests/core/test_trainer.py's config: 4 steps of batch 32.
    data = write_shapes_dataset(work / "shapes", per_class=32, size=32)
    config = config_from(
        "cpu-tiny", epochs=1, sync_bn=True, base_lr=0.01, final_lr=0.001, freeze_prototypes=0
    )
    print(f"equivalence: 2 {backend} ranks vs 1 process on {device_type}", flush=True)
    one = final_weights(config, data, work / "one", 1, device_type)
    two = final_weights(config, data, work / "two", 2, device_type)
    per_rank = final_weights(
        config.with_overrides(sync_bn=False), data, work / "per-rank", 2, device_type
    )
    difference, control = max_difference(two, one), max_difference(per_rank, one)
    checks = {
        "two_ranks_match": difference <= EQUIVALENCE_ATOL,
        "per_rank_batch_norm_differs": control > NEGATIVE_CONTROL_MIN,
    }
    report = {"backend": backend, "max_difference": difference,
              "negative_control_difference": control, "atol": EQUIVALENCE_ATOL, "checks": checks}
    (args.out / "equivalence.json").write_text(json.dumps(report, indent=1))
    print(f"  max |2 ranks - 1 process| = {difference:.2e} (bound {EQUIVALENCE_ATOL:.0e}); "
          f"per-rank batch norm: {control:.2e} (must exceed {NEGATIVE_CONTROL_MIN:.0e})")
    print(f"  checks: {checks}", flush=True)
    return all(checks.values())


# --- command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=["throughput", "equivalence"])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--out", type=Path, default=Path("var/gpu_check"))
    parser.add_argument("--steps", type=int, default=None, help="default 300 (--tiny: 12)")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (--tiny: 16)")
    parser.add_argument("--images", type=int, default=None, help="default 2048 (--tiny: 64)")
    parser.add_argument("--image-size", type=int, default=None, help="default 256 (--tiny: 56)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers; default: the CPUs less 2 (--tiny: 1)")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--bound-steps", type=int, default=None, help="default 20 (--tiny: 5)")
    parser.add_argument("--data-path", nargs="+", choices=["pil", "prepared"],
                        default=["pil", "prepared"],
                        help="decode with PIL in the loader workers, and/or read a prepared "
                        "copy and crop in batches on the GPU (both by default)")
    args = parser.parse_args(argv)
    defaults = {"steps": (300, 12), "batch": (128, 16), "images": (2048, 64),
                "image_size": (256, 56), "bound_steps": (20, 5),
                "workers": (max(1, len(os.sched_getaffinity(0)) - 2), 1)}
    for name, (gpu, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else gpu)
    args.log_every = 1 if args.tiny else 10
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny on a CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="swav-gpu-check-") as tmp:
        check = throughput if args.check == "throughput" else equivalence
        ok = check(args, Path(tmp))
    print(f"{args.check}: {'PASS' if ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
