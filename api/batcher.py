"""Micro-batching: the concurrent requests for one (model, layer) share forward passes.

A `Batcher` gathers the batches of concurrent requests for up to `embed_batch_window_ms`
(or until `embed_max_batch` images wait), runs ONE forward pass for all of them on the
service's single forward thread, and gives each request its own rows back. Requests are
never split, so a batch may exceed the cap when one request alone does. At most
`embed_max_queue_items` images wait per (model, layer); beyond that a request is refused
(`Overloaded`, answered 503).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Stats:
    """Counters of the embedding service, answered by GET /v1/embeddings/stats."""

    model_calls: int = 0  # forward passes
    forward_s: float = 0.0  # time spent in them
    items: int = 0  # images embedded
    requests: int = 0  # requests answered with embeddings
    loads: int = 0
    evictions: int = 0
    overloaded: int = 0


class Overloaded(Exception):
    """The model's queue is full."""


@dataclass
class _Pending:
    parts: list[torch.Tensor]  # one request's images, in slices
    count: int
    future: asyncio.Future[torch.Tensor]
    arrived: float


class Batcher:
    """Micro-batches the requests for one (model, layer); see the module docstring."""

    def __init__(
        self,
        run: Callable[[list[list[torch.Tensor]]], torch.Tensor],
        executor: ThreadPoolExecutor,
        stats: Stats,
        window_s: float,
        max_batch: int,
        max_queue: int,
    ) -> None:
        self._run = run
        self._executor = executor
        self._stats = stats
        self._window = window_s
        self._max_batch = max(1, max_batch)
        self._max_queue = max_queue
        self._pending: deque[_Pending] = deque()
        self._queued = 0
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def is_full_for(self, count: int) -> bool:
        """Whether `count` more images would be refused (Overloaded): checked before a
        request's images are decoded, so a refused request costs no decoding."""
        return bool(self._queued and self._queued + count > self._max_queue)

    async def submit(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The (unnormalised) rows of the images in `parts`, computed with whatever else
        is waiting."""
        count = sum(len(part) for part in parts)
        if self.is_full_for(count):
            raise Overloaded
        loop = asyncio.get_running_loop()
        future: asyncio.Future[torch.Tensor] = loop.create_future()
        self._pending.append(_Pending(parts, count, future, loop.time()))
        self._queued += count
        if self._queued >= self._max_batch:
            self._full.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            delay = self._pending[0].arrived + self._window - loop.time()
            if self._queued < self._max_batch and delay > 0:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), delay)
            taken: list[_Pending] = []
            count = 0
            while self._pending and (
                not taken or count + self._pending[0].count <= self._max_batch
            ):
                item = self._pending.popleft()
                self._queued -= item.count
                if not item.future.done():  # done: its request was cancelled
                    taken.append(item)
                    count += item.count
            if not taken:
                continue
            begin = loop.time()
            try:
                out = await loop.run_in_executor(
                    self._executor, self._run, [item.parts for item in taken]
                )
            except Exception as exc:
                for item in taken:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self._stats.model_calls += 1
            self._stats.forward_s += loop.time() - begin
            self._stats.items += count
            start = 0
            for item in taken:
                rows = out[start : start + item.count]
                start += item.count
                if not item.future.done():
                    item.future.set_result(rows)
