"""Batches made on the GPU ahead of the step that uses them, by a background thread.

The trainer waits for every step's loss (a host sync), so crops made on the training
device in the loop itself leave the GPU idle while the host issues them. Here a thread
takes the next raw batch and issues its crops on a side CUDA stream while the main
thread issues the current step and waits on it (a wait that releases the GIL); the
step's stream waits on the batch's event before using it. The order of batches and
their contents are those of the plain loop: only the time at which they are made moves.
On another device the same thread runs without streams (tests/core/test_device_prefetch.py
checks the order, errors and early stops there; bench/gpu_check.py the GPU).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar, cast

import torch

Raw = TypeVar("Raw")
Made = tuple[list[torch.Tensor], torch.Tensor]  # crop batches, indices

_DONE = object()


class DevicePrefetch(Generic[Raw]):
    """Iterate `make(raw)` for each raw batch of `source`, made up to `depth` batches
    ahead by a thread (on a side stream when `device` is a CUDA device)."""

    def __init__(
        self,
        source: Iterable[Raw],
        make: Callable[[Raw], Made],
        device: torch.device,
        depth: int = 2,
    ) -> None:
        self.source = source
        self.make = make
        self.device = device
        self.depth = depth

    def __iter__(self) -> Iterator[Made]:
        ready: queue.Queue[object] = queue.Queue(self.depth)
        stop = threading.Event()
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None

        def produce() -> None:
            try:
                with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                    for raw in self.source:
                        crops, indices = self.make(raw)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record(side)
                        while not stop.is_set():
                            try:
                                ready.put((crops, indices, done), timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                ready.put(_DONE)
            except BaseException as error:  # raised in the consumer, where it can be handled
                ready.put(error)

        thread = threading.Thread(target=produce, name="device-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, batch_indices, made = cast(
                    tuple[list[torch.Tensor], torch.Tensor, torch.cuda.Event | None], item
                )
                if made is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(made)
                    for crop in batch:
                        crop.record_stream(current)  # not reused by the side stream too early
                yield batch, batch_indices
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    ready.get(timeout=0.1)
            thread.join()
