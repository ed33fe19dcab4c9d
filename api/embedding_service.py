"""Embeddings from a stored checkpoint: model resolution, image decoding, a model cache, and
per-model micro-batching.

A request goes: resolve `model` (a checkpoint id, or a job id meaning that job's latest
available checkpoint) in the database, the answer reused for `embed_resolve_ttl_s` ->
fetch the model from an LRU cache bounded by count and by bytes of parameters (loaded
once, however many requests ask at the same time, on cuda when available) -> decode the
images (Pillow, allow-listed formats, byte and pixel caps) and preprocess them at the
checkpoint's `size_crops[0]`, in slices on several pool threads -> hand them to the
model's `Batcher` for the layer -> render the JSON answer.

The decoding is api/image_inputs.py; the micro-batching of concurrent requests for one
(model, layer) is api/batcher.py. The forward is `swav_core.embed.embed` itself
(unnormalised); normalising each request's rows afterwards is the same row-wise operation.

Decoding and preprocessing run in the request thread pool, forwards on one dedicated
thread (one device, one pass at a time); the event loop renders only small answers. This module
imports torch only inside functions: importing it (the API does at startup) stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.batcher import Batcher, Overloaded, Stats
from api.errors import ApiError
from api.image_inputs import decode_images
from api.lookups import stored_path
from swav_core.errors import CheckpointError
from swav_service.models import Checkpoint, Job
from swav_service.settings import Settings, get_settings

if TYPE_CHECKING:
    import torch

    from swav_core.model import SwAVModel

log = logging.getLogger(__name__)

Layer = Literal["backbone", "projection"]

RETRY_AFTER_S = 1
INLINE_RENDER_VALUES = 4096  # smaller answers are rendered on the event loop


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedModel:
    """The checkpoint a request's `model` names, and its file under the artifacts folder."""

    checkpoint_id: str
    path: Path


def _gone(checkpoint_id: str) -> ApiError:
    return ApiError(
        410,
        "checkpoint_gone",
        f"checkpoint {checkpoint_id} is no longer on disk (pruned or removed); "
        "use a newer checkpoint, or the job id for its latest one",
        "model",
    )


def resolve_model(
    session: Session, settings: Settings, tenant: str, identifier: str
) -> ResolvedModel:
    """A checkpoint id as is; a job id as its final checkpoint, else its highest step.

    404 `model_not_found` when neither exists for the tenant, 410 `checkpoint_gone` for a
    pruned checkpoint, 409 `model_not_ready` for a job with no checkpoint on disk yet.
    """
    row = session.scalar(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.id == identifier, Job.tenant == tenant)
    )
    if row is not None:
        path = stored_path(settings, row) if row.available else None
        if path is None:
            raise _gone(identifier)
        return ResolvedModel(row.id, path)
    job = session.scalar(select(Job).where(Job.id == identifier, Job.tenant == tenant))
    if job is None:
        raise ApiError(
            404,
            "model_not_found",
            f"no checkpoint or job with id {identifier!r}; pass a checkpoint id "
            "(GET /v1/jobs/{job_id}/checkpoints) or a job id",
            "model",
        )
    rows = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id, Checkpoint.available.is_(True))
        .order_by(Checkpoint.final.desc(), Checkpoint.step.desc(), Checkpoint.created_at.desc())
    )
    for candidate in rows:
        path = stored_path(settings, candidate)
        if path is not None:
            return ResolvedModel(candidate.id, path)
    raise ApiError(
        409,
        "model_not_ready",
        f"job {job.id} ({job.status}) has no checkpoint available yet; retry once it has "
        "written one (see GET /v1/jobs/{job_id}/checkpoints)",
        "model",
    )


# --------------------------------------------------------------------------- models


@dataclass
class LoadedModel:
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


def forward(model: SwAVModel, layer: Layer, batches: list[list[torch.Tensor]]) -> torch.Tensor:
    """One pass of `embed` (unnormalised) over the concatenated batches, on the CPU after."""
    import torch

    from swav_core.embed import embed

    parts = [part for batch in batches for part in batch]
    batch = parts[0] if len(parts) == 1 else torch.cat(parts)
    return embed(model, batch, layer, normalize=False, batch_size=len(batch)).cpu()


EncodingFormat = Literal["float", "base64"]


def render(
    checkpoint_id: str, features: torch.Tensor, normalize: bool, encoding: EncodingFormat
) -> bytes:
    """The response body: `{"object": "list", "model", "dim", "data": [{"index", "embedding"}]}`.

    `embedding` is a list of numbers, or with encoding "base64" the row's little-endian
    float32 bytes in base64 (as OpenAI's API does: smaller and faster to parse). Numbers
    are written with 9 significant digits, which give back the exact float32 value (and
    take half the time and space of Python's 17-digit repr of the widened double).
    """
    import torch
    import torch.nn.functional as F

    if normalize:
        features = F.normalize(features, dim=1)
    if encoding == "base64":
        array = features.numpy().astype("<f4")
        rows = ['"' + base64.b64encode(row.tobytes()).decode() + '"' for row in array]
    elif bool(torch.isfinite(features).all()):
        rows = ["[" + ",".join(map(_FLOAT32.format, row)) + "]" for row in features.tolist()]
    else:  # NaN/Infinity, spelt as Python's json module does
        rows = [json.dumps(row) for row in features.tolist()]
    head = json.dumps({"object": "list", "model": checkpoint_id, "dim": int(features.shape[1])})
    data = ",".join(f'{{"index":{i},"embedding":{row}}}' for i, row in enumerate(rows))
    return f'{head[:-1]},"data":[{data}]}}'.encode()


_FLOAT32 = "{:.9g}"


def prepare(
    payloads: Sequence[str | bytes], field_name: str, settings: Settings, offset: int, size: int
) -> torch.Tensor:
    """Decode (see `decode_images`), then preprocess as `swav_core.embed.preprocess` does.

    The same `eval_transform(size)`, applied to each group of same-sized images at once
    (one stacked uint8 batch): the same values, without the per-image overhead.
    """
    import torch
    from torchvision.transforms.v2 import functional as TF

    from swav_core.multicrop import eval_transform

    images = decode_images(payloads, field_name, settings, offset)
    transform = eval_transform(size)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.size, []).append(index)
    rows: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for indices in groups.values():
        pixels = torch.stack([TF.pil_to_tensor(images[i]) for i in indices])
        batch = transform(pixels).as_subclass(torch.Tensor)
        for row, index in zip(batch, indices, strict=True):
            rows[index] = row
    return torch.stack(rows)


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


class EmbeddingService:
    """Per API process: the model cache, the forward thread and the counters."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.cache = ModelCache(settings.embed_cache_models, settings.embed_cache_bytes, self.stats)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-forward")
        self._device: str | None = None
        self._prepare_threads = max(1, min(4, os.cpu_count() or 1))
        self._resolved: dict[tuple[str, str], tuple[float, ResolvedModel]] = {}

    async def resolve(self, tenant: str, identifier: str) -> ResolvedModel:
        """`resolve_model` in a short session, remembered for `embed_resolve_ttl_s`.

        Within that time a job id keeps naming the checkpoint it resolved to, even if the
        job writes a newer one; errors are never remembered.
        """
        loop = asyncio.get_running_loop()
        key = (tenant, identifier)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        resolved = await run_in_threadpool(self._resolve, tenant, identifier)
        ttl = self.settings.embed_resolve_ttl_s
        if ttl > 0:
            if len(self._resolved) >= 10_000:
                self._resolved.clear()
            self._resolved[key] = (loop.time() + ttl, resolved)
        return resolved

    def _resolve(self, tenant: str, identifier: str) -> ResolvedModel:
        from swav_service.db import get_sessionmaker

        with get_sessionmaker()() as session:  # short: not held while embedding
            return resolve_model(session, self.settings, tenant, identifier)

    @property
    def device(self) -> str:
        """settings.embed_device, else cuda when available, else cpu (imports torch)."""
        if self._device is None:
            import torch

            if self.settings.embed_torch_threads > 0:
                torch.set_num_threads(self.settings.embed_torch_threads)
            self._device = self.settings.embed_device or (
                "cuda" if torch.cuda.is_available() else "cpu"
            )
        return self._device

    async def _prepare(
        self, payloads: Sequence[str | bytes], field_name: str, size: int
    ) -> list[torch.Tensor]:
        """Decode and preprocess in up to `_prepare_threads` slices at once (pool threads)."""
        parts = max(1, min(self._prepare_threads, len(payloads) // 4))
        bounds = [len(payloads) * i // parts for i in range(parts + 1)]
        results = await asyncio.gather(
            *(
                run_in_threadpool(
                    prepare, payloads[lo:hi], field_name, self.settings, lo, size
                )
                for lo, hi in itertools.pairwise(bounds)
            ),
            return_exceptions=True,
        )
        tensors = []
        for result in results:  # the first bad image in request order wins
            if isinstance(result, BaseException):
                raise result
            tensors.append(result)
        return tensors

    def _batcher(self, entry: LoadedModel, layer: Layer) -> Batcher:
        batcher = entry.batchers.get(layer)
        if batcher is None:
            batcher = Batcher(
                partial(forward, entry.model, layer),
                self._executor,
                self.stats,
                self.settings.embed_batch_window_ms / 1000,
                self.settings.embed_max_batch,
                self.settings.embed_max_queue_items,
            )
            entry.batchers[layer] = batcher
        return batcher

    async def embed(
        self,
        resolved: ResolvedModel,
        payloads: Sequence[str | bytes],
        field_name: str,
        layer: Layer,
        normalize: bool,
        encoding: EncodingFormat = "float",
    ) -> bytes:
        """The JSON response body (see `render`); ApiError for bad images, a failed load or
        a full queue."""
        device = self._device
        if device is None:
            device = await run_in_threadpool(lambda: self.device)
        try:
            entry = await self.cache.get(
                resolved.checkpoint_id,
                partial(load_entry, resolved.checkpoint_id, resolved.path, device),
            )
        except CheckpointError as exc:
            if not resolved.path.is_file():  # pruned since it was resolved
                raise _gone(resolved.checkpoint_id) from exc
            raise ApiError(
                500,
                "checkpoint_failed",
                f"checkpoint {resolved.checkpoint_id} cannot be loaded: its file does not "
                "verify or load",
                "model",
            ) from exc
        batch = await self._prepare(payloads, field_name, entry.size)
        try:
            features = await self._batcher(entry, layer).submit(batch)
        except Overloaded:
            self.stats.overloaded += 1
            raise ApiError(
                503,
                "overloaded",
                f"too many images are waiting for model {resolved.checkpoint_id}; "
                f"retry in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        self.stats.requests += 1
        if features.numel() <= INLINE_RENDER_VALUES:  # cheaper than a thread hop
            return render(resolved.checkpoint_id, features, normalize, encoding)
        return await run_in_threadpool(
            render, resolved.checkpoint_id, features, normalize, encoding
        )

    def stats_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.stats),
            "queued_items": self.cache.queued_items,
            "cached_models": len(self.cache),
            "cached_bytes": self.cache.nbytes,
            "device": self._device,
        }


def get_service(request: Request) -> EmbeddingService:
    """The API process's embedding service, made on first use and kept on the app."""
    service: EmbeddingService | None = getattr(request.app.state, "embedding_service", None)
    if service is None:
        service = EmbeddingService(get_settings())
        request.app.state.embedding_service = service
    return service
