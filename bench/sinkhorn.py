"""Benchmarks: Sinkhorn against its unavoidable work, and the grouped multi-crop forward.

    python bench/sinkhorn.py [--repeats N] [--threads T]

(1) `sinkhorn` at n=4096, K=3000, fp32 (median of N runs after a warm-up), and in the
    same run a lower bound: one torch.exp over the same (n x K) matrix plus the 6
    sum-reductions of 3 iterations (rows + columns); prints sinkhorn / bound.
(2) ResNet-18 at 2x96 + 4x64 px, batch 32: one backbone pass per resolution group
    (SwAVModel.forward) against one pass per crop; eval-mode forward (no_grad) and
    train-mode forward+backward, each as per-crop time / grouped time and images/s.
Runs in well under 2 minutes on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swav_core.model import SwAVModel  # noqa: E402
from swav_core.sinkhorn import sinkhorn  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_sinkhorn(repeats: int, n: int = 4096, k: int = 3000, epsilon: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(n, 128, generator=gen), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 128, generator=gen), dim=1)
    scores = (z @ c.t()).contiguous()  # (n, K) fp32

    def bound() -> torch.Tensor:
        q = torch.exp(scores / epsilon)  # the one exp (and the scaling it needs)
        total = q.new_zeros(())
        for _ in range(3):
            total = total + q.sum(dim=1).sum() + q.sum(dim=0).sum()  # rows + columns
        return total

    t_sinkhorn = median_time(lambda: sinkhorn(scores, epsilon, 3), repeats)
    t_bound = median_time(bound, repeats)
    print(f"[1] sinkhorn n={n} K={k} fp32 eps={epsilon}, 3 iterations, median of {repeats}")
    print(f"    sinkhorn:            {t_sinkhorn * 1e3:8.1f} ms")
    print(f"    bound (exp + 6 sums): {t_bound * 1e3:8.1f} ms")
    print(f"    ratio sinkhorn/bound: {t_sinkhorn / t_bound:8.2f}x")


def bench_grouped_forward(repeats: int, batch: int = 32) -> None:
    torch.manual_seed(0)
    model = SwAVModel("resnet18", 2048, 128, 3000)
    crops = [torch.randn(batch, 3, 96, 96) for _ in range(2)] + [
        torch.randn(batch, 3, 64, 64) for _ in range(4)
    ]
    images = batch * len(crops)

    def grouped_eval() -> None:
        with torch.no_grad():
            model(crops)

    def per_crop_eval() -> None:
        with torch.no_grad():
            for crop in crops:
                model([crop])

    def grouped_train() -> None:
        model.zero_grad(set_to_none=True)
        z, scores = model(crops)
        (z.sum() + scores.sum()).backward()

    def per_crop_train() -> None:
        model.zero_grad(set_to_none=True)
        for crop in crops:
            z, scores = model([crop])
            (z.sum() + scores.sum()).backward()

    print(
        f"[2] resnet18, 2x96 + 4x64 px crops, batch {batch} ({images} crop-images per step), "
        f"{torch.get_num_threads()} threads, median of {repeats}"
    )
    for mode, grouped, per_crop in (
        ("eval forward (no_grad)", grouped_eval, per_crop_eval),
        ("train forward+backward", grouped_train, per_crop_train),
    ):
        model.train(mode.startswith("train"))
        t_grouped = median_time(grouped, repeats)
        t_per_crop = median_time(per_crop, repeats)
        print(f"    {mode}:")
        print(
            f"      grouped (2 passes):  {t_grouped * 1e3:8.1f} ms  "
            f"{images / t_grouped:8.1f} images/s"
        )
        print(
            f"      per crop (6 passes): {t_per_crop * 1e3:8.1f} ms  "
            f"{images / t_per_crop:8.1f} images/s"
        )
        print(f"      ratio per-crop/grouped: {t_per_crop / t_grouped:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    bench_sinkhorn(args.repeats)
    bench_grouped_forward(max(1, min(args.repeats, 3)))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
