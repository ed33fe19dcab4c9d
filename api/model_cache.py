"""Loaded models of the embeddings service: an LRU cache bounded by count and by bytes of
parameters, each model loaded once however many requests ask for it at the same time.

Each entry also holds the model's micro-batchers, one per layer (api/batcher.py), so
evicting a model drops its queues with it. Loading imports torch (inside `load_entry`),
so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool

from api.batcher import Batcher, Stats

if TYPE_CHECKING:
    from swav_core.model import SwAVModel

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model on its device, the side its images are embedded at, and its batchers."""

    checkpoint_id: str
    model: SwAVModel
    size: int  # the checkpoint's size_crops[0]: the side images are embedded at
    nbytes: int  # parameters and buffers
    batchers: dict[str, Batcher] = field(default_factory=dict)


def load_entry(checkpoint_id: str, path: Path, device: str) -> LoadedModel:
    """Load (in a worker thread) the checkpoint's model onto `device`, in eval mode."""
    from swav_core.exports import load_model

    model, config = load_model(path)
    model = model.to(device).eval()
    tensors = itertools.chain(model.parameters(), model.buffers())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return LoadedModel(checkpoint_id, model, config.size_crops[0], nbytes)


class ModelCache:
    """Loaded models, least recently used first out, bounded by count and by bytes.

    The newest model always stays, even alone over the byte bound. Concurrent requests for
    a model being loaded share that one load.
    """

    def __init__(self, max_models: int, max_bytes: int, stats: Stats) -> None:
        self.max_models = max(1, max_models)
        self.max_bytes = max_bytes
        self._stats = stats
        self._entries: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    @property
    def queued_items(self) -> int:
        """Images waiting for a forward pass, over every cached model and layer."""
        return sum(b.queued for e in self._entries.values() for b in e.batchers.values())

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str, load: Callable[[], LoadedModel]) -> LoadedModel:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key, load))
            self._loading[key] = task
        return await asyncio.shield(task)

    async def _load(self, key: str, load: Callable[[], LoadedModel]) -> LoadedModel:
        try:
            entry = await run_in_threadpool(load)
        finally:
            self._loading.pop(key, None)
        self._stats.loads += 1
        self._entries[key] = entry
        while len(self._entries) > 1 and (
            len(self._entries) > self.max_models or self.nbytes > self.max_bytes
        ):
            evicted, _ = self._entries.popitem(last=False)
            self._stats.evictions += 1
            log.info("evicted model %s from the embedding cache", evicted)
        return entry
