"""CPU cost of the training input per image: the PIL path against prepared tensors + batches.

The paper's multi-crop (2 x 224 + 6 x 96, imagenet-800ep scales) from 500 x 375 JPEGs,
ImageNet's typical size, made here with PIL:

- pil: what `swav_core.data.MultiCropDataset` does per sample: decode (`rgb_frame`), then
  `MultiCropTransform` under a forked RNG seeded from the sample's key;
- decode: the decode and the cap to the prepared copy's shorter side (256 px:
  `swav_core.prepared.capped_rgb`), paid once at ingestion by a prepared dataset
  (reported apart, not part of the tensor path);
- tensor: `BatchMultiCrop` on those uint8 tensors, as the prepared copy holds them and
  `swav_core.prepared_loader` hands them over, a whole batch per call.

CPU time is the process's (all its threads), the least of `--repeats` runs since other
work on the machine only adds to it. Prints a table and, with --json, the figures.

    .venv/bin/python bench/data_cost.py [--images 64] [--threads 1 2] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as swav-train and the worker run it

import argparse  # noqa: E402
import io
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from swav_core.batch_multicrop import BatchMultiCrop
from swav_core.data import mix_seed
from swav_core.images import rgb_frame
from swav_core.multicrop import MultiCropTransform
from swav_core.prepared import DEFAULT_MAX_SHORT_SIDE, capped_rgb
from swav_core.presets import config_from

WIDTH, HEIGHT = 500, 375


def synthetic_jpegs(count: int) -> list[bytes]:
    """Photographs' statistics roughly: smooth colour fields with edges and fine noise."""
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (HEIGHT // 25, WIDTH // 25, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.BICUBIC))
        grain = rng.normal(0, 12, smooth.shape)
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def decode(blob: bytes) -> Image.Image:
    with Image.open(io.BytesIO(blob)) as image:
        return rgb_frame(image)


def prepared_tensor(blob: bytes) -> torch.Tensor:
    """The image as the prepared copy holds it, laid out as PreparedDataset gives it:
    (3, H, W) uint8 over channels-last memory, shorter side capped."""
    pixels = capped_rgb(decode(blob), DEFAULT_MAX_SHORT_SIDE)  # (3, H, W)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(1, 2, 0))).permute(2, 0, 1)


def least_cpu_ms(work: Callable[[], object], images: int, repeats: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per image, the least over `repeats` runs after one warm-up."""
    work()
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        work()
        cpu.append((time.process_time() - cpu_start) * 1e3 / images)
        wall.append((time.perf_counter() - wall_start) * 1e3 / images)
    return min(cpu), min(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()

    config = config_from("imagenet-800ep")
    blobs = synthetic_jpegs(args.images)
    tensors = [prepared_tensor(blob) for blob in blobs]
    seeds = [mix_seed(config.seed, 0, index) for index in range(args.images)]
    pil_transform = MultiCropTransform.from_config(config)
    batch_transform = BatchMultiCrop.from_config(config)

    def pil_path() -> None:
        for blob, seed in zip(blobs, seeds, strict=True):
            image = decode(blob)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                pil_transform(image)

    def decode_only() -> None:
        for blob in blobs:
            prepared_tensor(blob)

    def tensor_path() -> None:
        batch_transform(tensors, seeds)

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        pil = least_cpu_ms(pil_path, args.images, args.repeats)
        dec = least_cpu_ms(decode_only, args.images, args.repeats)
        ten = least_cpu_ms(tensor_path, args.images, args.repeats)
        rows.append(
            {
                "threads": threads,
                "pil_cpu_ms": pil[0],
                "pil_wall_ms": pil[1],
                "decode_cpu_ms": dec[0],
                "tensor_cpu_ms": ten[0],
                "tensor_wall_ms": ten[1],
                "ratio_cpu": ten[0] / pil[0],
                "ratio_cpu_with_decode": (ten[0] + dec[0]) / pil[0],
            }
        )

    crops = " + ".join(f"{n}x{s}" for n, s in zip(config.n_crops, config.size_crops, strict=True))
    print(f"multi-crop {crops} from {args.images} JPEGs of {WIDTH}x{HEIGHT}, CPU ms per image")
    print(
        f"{'threads':>7} {'pil':>8} {'decode':>8} {'tensor':>8} {'tensor/pil':>11} "
        f"{'(tensor+decode)/pil':>20} {'pil wall':>9} {'tensor wall':>12}"
    )
    for row in rows:
        print(
            f"{row['threads']:>7} {row['pil_cpu_ms']:>8.2f} {row['decode_cpu_ms']:>8.2f} "
            f"{row['tensor_cpu_ms']:>8.2f} {row['ratio_cpu']:>11.3f} "
            f"{row['ratio_cpu_with_decode']:>20.3f} {row['pil_wall_ms']:>9.2f} "
            f"{row['tensor_wall_ms']:>12.2f}"
        )
    print("goal: tensor/pil <= 0.25 (issue 15); decode is paid once, at ingestion")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
