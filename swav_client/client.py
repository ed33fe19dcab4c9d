"""`SwavClient`: the service's REST API (v1) over httpx, with typed results.

One method per operation of the API: datasets, jobs and their events, checkpoints,
embeddings. Sending, error answers and the retry rules (what is repeated, and why) are
`ApiSession`'s, in `swav_client/session.py`.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from collections.abc import Iterator, Sequence
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from swav_client.errors import ApiError, ChecksumMismatch, ServerUnreachable
from swav_client.session import ApiSession, backoff_s
from swav_client.sse import parse_sse
from swav_client.types import (
    Backbones,
    Checkpoint,
    Dataset,
    Embeddings,
    Event,
    Job,
    JobPlan,
    Page,
    Weights,
)
from swav_client.upload import TransferProgress, upload_body

# The events stream sends a keep-alive every 15 s (api/routes/events.py): 60 s of silence
# means the connection is dead, so reconnect.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=60.0)
EMBED_BATCH = 64  # the server's default SWAV_MAX_EMBEDDING_ITEMS
PAGE_LIMIT = 200  # the largest page the API gives (api/pagination.py MAX_LIMIT)
DOWNLOAD_FORMATS = ("full", "safetensors", "backbone", "timm", "onnx")


def attachment_name(response: httpx.Response) -> str | None:
    """The file name of a Content-Disposition header (RFC 6266, filename* too), no folders."""
    header = response.headers.get("Content-Disposition")
    if not header:
        return None
    message = Message()
    message["Content-Disposition"] = header
    name = message.get_filename()
    return (Path(name).name or None) if name else None


class SwavClient(ApiSession):
    """A client of one swav-service deployment. Use as a context manager, or `close()`.

    `api_key` is sent as `Authorization: Bearer <key>`. `transport` is passed to httpx
    (e.g. `httpx.HTTPTransport(uds=...)`). Calls are retried as `swav_client.session`
    describes.
    """

    # ------------------------------------------------------------------ datasets

    def upload_dataset(
        self, path: str | Path, name: str | None = None, progress: TransferProgress | None = None
    ) -> Dataset:
        """Upload a folder of images (packed to tar on the fly) or a zip/tar(.gz) archive.

        The answer is `validating`; see `wait_dataset`. `progress(n, total)` is called as
        bytes are handed to the connection. Raises FileNotFoundError or NotUploadable for
        a path that cannot be uploaded, before anything is sent.
        """
        upload = upload_body(Path(path), name)
        headers = {"Content-Type": upload.content_type, "Content-Length": str(upload.length)}

        def body() -> dict[str, Any]:
            return {"content": upload.chunks(progress)}

        # Not idempotent (the route has no Idempotency-Key): never resent after the body
        # may have reached the server.
        return self._post(
            "/v1/datasets", Dataset, headers=headers, body=body,
            timeout=httpx.Timeout(60.0, connect=10.0, write=300.0),
        )

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._get(f"/v1/datasets/{dataset_id}", Dataset)

    def list_datasets(self, limit: int | None = None, cursor: str | None = None) -> Page[Dataset]:
        return self._get("/v1/datasets", Page[Dataset], limit=limit, cursor=cursor)

    def delete_dataset(self, dataset_id: str) -> None:
        self._send("DELETE", f"/v1/datasets/{dataset_id}", idempotent=False)

    def wait_dataset(
        self, dataset_id: str, timeout_s: float | None = None, poll_s: float = 0.5
    ) -> Dataset:
        """Poll until the dataset is no longer `validating` (ready or failed); return it.

        Raises TimeoutError after `timeout_s`. The interval grows from `poll_s` to 5 s.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            dataset = self.get_dataset(dataset_id)
            if dataset.status != "validating":
                return dataset
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"dataset {dataset_id} still validating after {timeout_s} s")
            time.sleep(poll_s)
            poll_s = min(5.0, poll_s * 1.5)

    # ------------------------------------------------------------------ jobs

    def create_job(
        self,
        dataset_id: str,
        preset: str | None = None,
        config: dict[str, Any] | None = None,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        resources: dict[str, int] | None = None,
        keep_best_by: str | None = None,
        max_attempts: int | None = None,
        max_runtime_s: float | None = None,
        start_from: dict[str, str] | None = None,
    ) -> Job:
        """Submit a training job; `config` overrides the preset's TrainConfig fields.

        `resources` is {"gpus": N, "nodes": M}; `keep_best_by`, `max_attempts` and
        `max_runtime_s` are the job options of `POST /v1/jobs` (server defaults if None).
        `start_from` is {"checkpoint_id": ...} or {"weights_id": ...} (`upload_weights`):
        the run starts from those weights instead of random ones.

        Every call sends an Idempotency-Key (a new random one unless given): retries of
        this call reuse it, and so may a caller that repeats the call with the same key.
        """
        payload: dict[str, Any] = {"dataset_id": dataset_id, "config": config or {}}
        options = (
            ("preset", preset), ("name", name), ("metadata", metadata),
            ("resources", resources), ("keep_best_by", keep_best_by),
            ("max_attempts", max_attempts), ("max_runtime_s", max_runtime_s),
            ("start_from", start_from),
        )
        for key, value in options:
            if value is not None:
                payload[key] = value
        key = idempotency_key or str(uuid.uuid4())
        return self._post(
            "/v1/jobs", Job, idempotent=True, json=payload, headers={"Idempotency-Key": key}
        )

    def plan_job(
        self,
        dataset_id: str,
        preset: str | None = None,
        config: dict[str, Any] | None = None,
        resources: dict[str, int] | None = None,
    ) -> JobPlan:
        """A dry run of `create_job`: the resolved config, the reasons of auto's choices
        and the estimated time and memory on the workers that fit; nothing is queued."""
        payload: dict[str, Any] = {"dataset_id": dataset_id, "config": config or {},
                                   "dry_run": True}
        if preset is not None:
            payload["preset"] = preset
        if resources is not None:
            payload["resources"] = resources
        return self._post("/v1/jobs", JobPlan, idempotent=True, json=payload)

    # ------------------------------------------------------------------ weights

    def upload_weights(
        self, path: str | Path, name: str | None = None, progress: TransferProgress | None = None
    ) -> Weights:
        """Upload a .safetensors state dict (e.g. a backbone export, torchvision or timm
        weights) that jobs may start from with `start_from={"weights_id": ...}`."""
        path = Path(path)
        size = path.stat().st_size  # FileNotFoundError before anything is sent

        def chunks() -> Iterator[bytes]:
            sent = 0
            with open(path, "rb") as file:
                while data := file.read(1 << 20):
                    sent += len(data)
                    if progress is not None:
                        progress(sent, size)
                    yield data

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        # Not idempotent: never resent after the body may have reached the server.
        return self._post(
            "/v1/weights", Weights, headers=headers, params={"name": name or path.stem},
            body=lambda: {"content": chunks()},
            timeout=httpx.Timeout(60.0, connect=10.0, write=300.0),
        )

    def list_weights(self, limit: int | None = None, cursor: str | None = None) -> Page[Weights]:
        return self._get("/v1/weights", Page[Weights], limit=limit, cursor=cursor)

    def get_weights(self, weights_id: str) -> Weights:
        return self._get(f"/v1/weights/{weights_id}", Weights)

    def delete_weights(self, weights_id: str) -> None:
        self._send("DELETE", f"/v1/weights/{weights_id}", idempotent=False)

    def get_job(self, job_id: str) -> Job:
        return self._get(f"/v1/jobs/{job_id}", Job)

    def list_jobs(
        self,
        status: str | Sequence[str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Job]:
        """The jobs, newest first; `status` filters ("queued,running" or a list)."""
        if status is not None and not isinstance(status, str):
            status = ",".join(status)
        return self._get("/v1/jobs", Page[Job], status=status, limit=limit, cursor=cursor)

    def cancel_job(self, job_id: str) -> Job:
        return self._post(f"/v1/jobs/{job_id}/cancel", Job)

    def resume_job(self, job_id: str) -> Job:
        return self._post(f"/v1/jobs/{job_id}/resume", Job)

    def list_events(self, job_id: str, after: int = 0, limit: int | None = None) -> Page[Event]:
        """One page of the job's events with seq > after; `next_cursor` is the next `after`."""
        return self._get(f"/v1/jobs/{job_id}/events", Page[Event], after=after, limit=limit)

    def iter_events(self, job_id: str, after: int = 0) -> Iterator[Event]:
        """Every event so far with seq > after, page by page (does not wait for more)."""
        while True:
            page = self.list_events(job_id, after=after, limit=PAGE_LIMIT)
            yield from page.data
            if page.next_cursor is None:
                return
            after = int(page.next_cursor)

    def stream_events(self, job_id: str, after: int = 0) -> Iterator[Event]:
        """The job's events live (server-sent events), from seq > after, until it finishes.

        The server ends the stream once the job is terminal and every event was sent. A
        stream that breaks is reopened where it stopped (`Last-Event-ID`), up to
        `max_retries` times in a row without progress.
        """
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if after:
                headers["Last-Event-ID"] = str(after)
            response = self._send(
                "GET", f"/v1/jobs/{job_id}/events", idempotent=True, stream=True,
                headers=headers, timeout=STREAM_TIMEOUT,
            )
            try:
                for message in parse_sse(response.iter_lines()):
                    event = Event.model_validate_json(message.data)
                    after, failures = event.seq, 0
                    yield event
                return
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.max_retries:
                    raise ServerUnreachable(
                        f"the event stream of {job_id} keeps breaking ({exc!r})"
                    ) from exc
                time.sleep(backoff_s(failures - 1))
            finally:
                response.close()

    # ------------------------------------------------------------------ checkpoints

    # ------------------------------------------------------------------ backbones

    def list_backbones(self, contains: str | None = None, family: str | None = None) -> Backbones:
        """Backbone names a job may give (`own`, `timm` or `torchvision` family)."""
        return self._get("/v1/backbones", Backbones, contains=contains, family=family)

    def list_checkpoints(
        self, job_id: str, limit: int | None = None, cursor: str | None = None
    ) -> Page[Checkpoint]:
        return self._get(
            f"/v1/jobs/{job_id}/checkpoints", Page[Checkpoint], limit=limit, cursor=cursor
        )

    def get_checkpoint(self, checkpoint_id: str) -> Checkpoint:
        return self._get(f"/v1/checkpoints/{checkpoint_id}", Checkpoint)

    def download_checkpoint(
        self,
        checkpoint_id: str,
        out: str | Path = ".",
        format: str = "full",
        progress: TransferProgress | None = None,
    ) -> Path:
        """Download to `out` (a folder: the server's file name in it) and return the path.

        The file is written next to its target as `.part`, its sha256 compared with the
        server's `X-Checksum-SHA256`, then renamed into place; on a mismatch it is deleted
        and ChecksumMismatch raised. `progress(n, total)` is called per chunk.
        """
        if format not in DOWNLOAD_FORMATS:
            raise ValueError(f"format {format!r}: use one of {', '.join(DOWNLOAD_FORMATS)}")
        response = self._send(
            "GET", f"/v1/checkpoints/{checkpoint_id}/download", idempotent=True, stream=True,
            params={"format": format},
        )
        try:
            target = Path(out)
            if target.is_dir():
                target = target / (attachment_name(response) or f"{checkpoint_id}.{format}")
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            partial = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            try:
                with open(partial, "wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        f.write(chunk)
                        digest.update(chunk)
                        if progress is not None:
                            progress(len(chunk), total)
            except httpx.TransportError as exc:
                partial.unlink(missing_ok=True)
                raise ServerUnreachable(f"the download of {checkpoint_id} broke ({exc!r})") from exc
            expected = response.headers.get("X-Checksum-SHA256")
            if expected and digest.hexdigest() != expected.lower():
                partial.unlink(missing_ok=True)
                raise ChecksumMismatch(
                    f"{checkpoint_id}: downloaded sha256 {digest.hexdigest()} differs from the "
                    f"server's {expected}; download it again"
                )
            partial.replace(target)
            return target
        finally:
            response.close()

    # ------------------------------------------------------------------ embeddings

    def embed(
        self,
        model: str,
        images: Sequence[str | Path | bytes],
        layer: str = "backbone",
        normalize: bool = True,
        batch_size: int = EMBED_BATCH,
    ) -> Embeddings:
        """Embeddings of `images` (paths or encoded bytes) with a checkpoint or job id.

        Sent as multipart in batches of `batch_size` (the server caps images per request);
        the answer's float32 bytes are decoded exactly. A job id is resolved by the first
        batch, and later batches use that checkpoint, so all rows come from one model
        even if the job writes a new checkpoint meanwhile.
        """
        if not images:
            raise ValueError("no images to embed")
        rows: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            files = [("files", _image_part(image, start + i)) for i, image in enumerate(batch)]
            fields = {
                "model": model,
                "layer": layer,
                "normalize": "true" if normalize else "false",
                "encoding_format": "base64",
            }
            response = self._send(
                "POST", "/v1/embeddings", idempotent=True, data=fields, files=files
            )
            answer = response.json()
            model = answer["model"]
            ordered = sorted(answer["data"], key=lambda item: item["index"])
            if len(ordered) != len(batch):
                raise ApiError(
                    response.status_code, "invalid_response",
                    f"{len(ordered)} embeddings for {len(batch)} images",
                )
            rows.extend(
                np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
                for item in ordered
            )
        return Embeddings(model=model, vectors=np.stack(rows).astype(np.float32, copy=False))


def _image_part(image: str | Path | bytes, index: int) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return f"image-{index}", image
    path = Path(image)
    return path.name, path.read_bytes()
