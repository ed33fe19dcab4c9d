"""DevicePrefetch's thread on the CPU: the batches of the plain loop in its order, a
failure raised where the batches are used, and an early stop that ends the thread.
(On a GPU the side stream is exercised by bench/gpu_check.py: the same loss curve as
without prefetching, docs/gpu_check_h200.json.)"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from swav_core.device_prefetch import DevicePrefetch

CPU = torch.device("cpu")


def make(i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [torch.full((2, 3), float(i)), torch.full((1,), float(-i))], torch.tensor([i])


def test_the_batches_and_their_order_are_the_plain_loops() -> None:
    plain = [make(i) for i in range(7)]
    prefetched = list(DevicePrefetch(range(7), make, CPU, depth=2))
    assert len(prefetched) == 7
    for (crops, indices), (want_crops, want_indices) in zip(prefetched, plain, strict=True):
        assert torch.equal(indices, want_indices)
        assert all(torch.equal(a, b) for a, b in zip(crops, want_crops, strict=True))
    assert [int(i) for _, i in DevicePrefetch(range(3), make, CPU)] == [0, 1, 2]  # again


def test_a_failure_making_a_batch_is_raised_to_the_consumer() -> None:
    def failing(i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        if i == 3:
            raise ValueError("image 3 is unreadable")
        return make(i)

    got = []
    with pytest.raises(ValueError, match="image 3"):
        for _, indices in DevicePrefetch(range(10), failing, CPU):
            got.append(int(indices))
    assert got == [0, 1, 2]


def test_stopping_early_ends_the_thread_without_reading_the_whole_source() -> None:
    taken: list[int] = []

    def source() -> Iterator[int]:
        for i in range(1000):
            taken.append(i)
            yield i

    iterator = iter(DevicePrefetch(source(), make, CPU, depth=2))
    assert int(next(iterator)[1]) == 0
    iterator.close()  # as the trainer does when it stops mid-epoch
    assert not [t for t in threading.enumerate() if t.name == "device-prefetch"]
    assert len(taken) <= 5  # one in use, up to depth queued, one being made
