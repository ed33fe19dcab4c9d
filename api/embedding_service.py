"""Embeddings from a stored checkpoint: model resolution, image decoding, a model cache, and
per-model micro-batching.

A request goes: resolve `model` (a checkpoint id, or a job id meaning that job's latest
available checkpoint) in the database, the answer reused for `embed_resolve_ttl_s` ->
fetch the model from an LRU cache bounded by count and by bytes of parameters (loaded
once, however many requests ask at the same time, on cuda when available) -> decode the
images (Pillow, allow-listed formats, byte and pixel caps) and preprocess them at the
checkpoint's `size_crops[0]`, in slices on several pool threads -> hand them to the
model's `Batcher` for the layer -> render the JSON answer.

Resolving `model` is api/model_resolution.py, the model cache api/model_cache.py, the
decoding api/image_inputs.py; the micro-batching of concurrent requests for one
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
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.batcher import Batcher, Overloaded, Stats
from api.errors import ApiError
from api.image_inputs import checked_payloads, decode_image
from api.model_cache import LoadedModel, ModelCache, load_entry
from api.model_resolution import ResolvedModel, model_gone, resolve_model
from api.schemas.common import Layer
from swav_core.errors import CheckpointError
from swav_service.settings import Settings, get_settings

if TYPE_CHECKING:
    import torch

    from swav_core.model import SwAVModel

RETRY_AFTER_S = 1
INLINE_RENDER_VALUES = 4096  # smaller answers are rendered on the event loop


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
    data: Sequence[bytes], field_name: str, settings: Settings, offset: int, size: int
) -> torch.Tensor:
    """Decode (`decode_image`), then preprocess as `swav_core.embed.preprocess` does.

    The same `eval_transform(size)`, applied to each group of same-sized images at once
    (one stacked uint8 batch): the same values, without the per-image overhead. Images are
    decoded a chunk at a time, at most PREPARE_CHUNK_PIXELS (or one image) each, and only
    their model-sized rows are kept: a request of large images never holds them all
    decoded at once.
    """
    import torch

    rows: list[torch.Tensor] = []
    chunk: list[Image.Image] = []
    pixels = 0
    for index, payload in enumerate(data, start=offset):
        image = decode_image(payload, f"{field_name}.{index}", settings.max_image_pixels)
        if chunk and pixels + image.width * image.height > PREPARE_CHUNK_PIXELS:
            rows.extend(_preprocessed(chunk, size))
            chunk, pixels = [], 0
        chunk.append(image)
        pixels += image.width * image.height
    rows.extend(_preprocessed(chunk, size))
    return torch.stack(rows)


PREPARE_CHUNK_PIXELS = 16_000_000


def _preprocessed(images: list[Image.Image], size: int) -> list[torch.Tensor]:
    """`eval_transform(size)` of each image, in order, one stacked call per image size."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from swav_core.multicrop import eval_transform

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
    return rows


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
        self, payloads: Sequence[bytes], field_name: str, size: int
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
                raise model_gone(resolved.checkpoint_id) from exc
            raise ApiError(
                500,
                "checkpoint_failed",
                f"checkpoint {resolved.checkpoint_id} cannot be loaded: its file does not "
                "verify or load",
                "model",
            ) from exc
        data = await run_in_threadpool(checked_payloads, payloads, field_name, self.settings)
        batcher = self._batcher(entry, layer)
        if batcher.is_full_for(len(data)):  # refused before any image is decoded
            raise self._overloaded(resolved.checkpoint_id)
        batch = await self._prepare(data, field_name, entry.size)
        try:
            features = await batcher.submit(batch)
        except Overloaded:
            raise self._overloaded(resolved.checkpoint_id) from None
        self.stats.requests += 1
        if features.numel() <= INLINE_RENDER_VALUES:  # cheaper than a thread hop
            return render(resolved.checkpoint_id, features, normalize, encoding)
        return await run_in_threadpool(
            render, resolved.checkpoint_id, features, normalize, encoding
        )

    def _overloaded(self, checkpoint_id: str) -> ApiError:
        self.stats.overloaded += 1
        return ApiError(
            503,
            "overloaded",
            f"too many images are waiting for model {checkpoint_id}; retry in {RETRY_AFTER_S} s",
            headers={"Retry-After": str(RETRY_AFTER_S)},
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
