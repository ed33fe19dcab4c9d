"""Sinkhorn over a process group: 2 gloo ranks with half the batch each == 1 process.

The codes must be those of the GLOBAL batch (prototype sums and the max are all-reduced),
so concatenating the ranks' codes in rank order gives the single-process codes. The loss
is a mean over each rank's local batch (n/2 rows), so each rank's gradient rows are the
single-process gradient rows (a mean over n rows) times the world size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from swav_core.loss import swav_loss
from swav_core.sinkhorn import sinkhorn

WORLD = 2
N, K, CROPS = 8, 10, 4  # 2+2 crops of n=8 samples, K=10 prototypes
ASSIGN = (0, 1)
EPSILONS = (0.05, 0.5)
DTYPES = (torch.float64, torch.float32)


def make_scores(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    return [
        (torch.rand(N, K, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        for _ in range(CROPS)
    ]


def codes_and_grads(
    scores: list[torch.Tensor], epsilon: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Codes of the assigned crops, loss gradients w.r.t. every crop's scores, and the loss."""
    dtype = scores[0].dtype
    codes = [sinkhorn(scores[a], epsilon, 3, dtype=dtype) for a in ASSIGN]
    leaves = [s.detach().clone().requires_grad_() for s in scores]
    loss = swav_loss(leaves, 0.1, epsilon, 3, ASSIGN)
    grads = list(torch.autograd.grad(loss, leaves))
    return codes, grads, loss.detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        results = {}
        for dtype in DTYPES:
            local = [s[rows] for s in make_scores(dtype)]
            for epsilon in EPSILONS:
                results[(str(dtype), epsilon)] = codes_and_grads(local, epsilon)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(
        _worker,
        args=(str(tmp / "pg_init"), str(tmp)),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 0.0, "atol": 1e-12 if dtype == torch.float64 else 1e-6}


def matches_single_process(
    codes: list[torch.Tensor], grads: list[torch.Tensor], single: tuple, dtype: torch.dtype
) -> bool:
    """Rank-ordered codes == single codes, and rank gradients / world == single gradients."""
    single_codes, single_grads, _ = single
    tol = _tol(dtype)
    ok_codes = all(torch.allclose(c, s, **tol) for c, s in zip(codes, single_codes, strict=True))
    ok_grads = all(
        torch.allclose(g / WORLD, s, **tol) for g, s in zip(grads, single_grads, strict=True)
    )
    return ok_codes and ok_grads


@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
def test_two_ranks_equal_one_process(
    rank_results: list[dict], dtype: torch.dtype, epsilon: float
) -> None:
    single = codes_and_grads(make_scores(dtype), epsilon)
    per_rank = [r[(str(dtype), epsilon)] for r in rank_results]
    codes = [torch.cat([pr[0][i] for pr in per_rank]) for i in range(len(ASSIGN))]
    grads = [torch.cat([pr[1][v] for pr in per_rank]) for v in range(CROPS)]
    tol = _tol(dtype)
    for got, want in zip(codes, single[0], strict=True):
        torch.testing.assert_close(got, want, **tol)
    for got, want in zip(grads, single[1], strict=True):
        # each rank averages over N/WORLD rows, the single process over N rows
        torch.testing.assert_close(got / WORLD, want, **tol)
    # equal halves: the mean of the rank losses is the single-process loss
    mean_loss = sum(pr[2] for pr in per_rank) / WORLD
    torch.testing.assert_close(mean_loss, single[2], **tol)
    assert matches_single_process(codes, grads, single, dtype)


@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
def test_per_rank_sinkhorn_would_fail(dtype: torch.dtype, epsilon: float) -> None:
    """A Sinkhorn that only sees its own half (no process group) is NOT the same problem."""
    assert not dist.is_initialized()
    scores = make_scores(dtype)
    single = codes_and_grads(scores, epsilon)
    halves = [
        codes_and_grads([s[r * N // WORLD : (r + 1) * N // WORLD] for s in scores], epsilon)
        for r in range(WORLD)
    ]
    codes = [torch.cat([h[0][i] for h in halves]) for i in range(len(ASSIGN))]
    grads = [torch.cat([h[1][v] for h in halves]) for v in range(CROPS)]
    assert not torch.allclose(codes[0], single[0][0], **_tol(dtype))
    assert not matches_single_process(codes, grads, single, dtype)
