"""POST /v1/embeddings over real HTTP: a `swav-service api` process on a migrated PostgreSQL
database, with real cpu-tiny checkpoints saved by `save_checkpoint` and their rows written
straight into the database (no worker runs).

Every embedding is checked against `swav_core.embed.embed` on the same checkpoint, with
the images read by `swav_core.images.load_rgb`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy.orm import Session

from swav_core.checkpoint import save_checkpoint
from swav_core.embed import embed
from swav_core.exports import load_model
from swav_core.images import load_rgb
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_service.models import Checkpoint, Dataset, Job, new_id
from tests.api.conftest import Deployment, assert_error
from tests.conftest import Service

LIMITS = {
    "SWAV_MAX_EMBEDDING_ITEMS": "8",
    "SWAV_MAX_IMAGE_BYTES": "60000",
    "SWAV_MAX_IMAGE_PIXELS": "1000000",
    "SWAV_MAX_REQUEST_PIXELS": "2000000",
    "SWAV_EMBED_BATCH_WINDOW_MS": "10",
    "SWAV_EMBED_TORCH_THREADS": "1",
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return LIMITS


@dataclass
class Seeded(Deployment):
    """The module's deployment with real checkpoints of jobs on one ready dataset."""

    final_id: str = ""  # job_trained's final checkpoint
    step_id: str = ""  # job_trained's step checkpoint
    steps_job: str = ""  # a job with step checkpoints 2 and 6 only
    step6_id: str = ""
    empty_job: str = ""  # a running job with no checkpoint yet
    pruned_id: str = ""
    job_trained: str = ""


def add_job(session: Session, dataset_id: str, status: str) -> str:
    config = config_from("cpu-tiny")
    job_id = new_id("job")
    session.add(
        Job(
            id=job_id,
            tenant="local",
            dataset_id=dataset_id,
            status=status,
            preset="cpu-tiny",
            config=config.model_dump(mode="json"),
            epochs=config.epochs,
        )
    )
    session.flush()
    return job_id


def add_checkpoint(
    deployment: Seeded, session: Session, job_id: str, step: int, final: bool, seed: int
) -> str:
    """A real cpu-tiny checkpoint with random weights and random batch-norm statistics."""
    torch.manual_seed(seed)
    config = config_from("cpu-tiny")
    model = SwAVModel.from_config(config)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
    run_dir = deployment.artifacts / "jobs" / job_id / "run"
    info = save_checkpoint(run_dir, state, step=step, keep_last=10, final=final)
    assert info.sha256 is not None and info.size is not None
    checkpoint_id = new_id("ckpt")
    session.add(
        Checkpoint(
            id=checkpoint_id,
            job_id=job_id,
            step=step,
            epoch=1,
            final=final,
            path=str(info.path.relative_to(deployment.artifacts)),
            size_bytes=info.size,
            sha256=info.sha256,
        )
    )
    session.flush()
    return checkpoint_id


@pytest.fixture(scope="module")
def deployment(deployment: Deployment) -> Seeded:
    """The shared deployment (tests/api/conftest.py), seeded: this fixture overrides it."""
    d = Seeded(deployment.service, deployment.engine)
    with Session(d.engine) as session:
        ds = new_id("ds")
        session.add(Dataset(id=ds, tenant="local", name="x", status="ready"))
        session.flush()
        d.job_trained = add_job(session, ds, "succeeded")
        d.step_id = add_checkpoint(d, session, d.job_trained, 4, False, seed=1)
        d.final_id = add_checkpoint(d, session, d.job_trained, 8, True, seed=2)
        d.steps_job = add_job(session, ds, "running")
        add_checkpoint(d, session, d.steps_job, 2, False, seed=3)
        d.step6_id = add_checkpoint(d, session, d.steps_job, 6, False, seed=4)
        d.empty_job = add_job(session, ds, "running")
        pruned_job = add_job(session, ds, "running")
        d.pruned_id = add_checkpoint(d, session, pruned_job, 2, False, seed=5)
        pruned = session.get(Checkpoint, d.pruned_id)
        assert pruned is not None
        pruned.available = False
        session.commit()
    return d


@pytest.fixture
def client(deployment: Seeded) -> Iterator[httpx.Client]:
    with deployment.service.client() as client:
        yield client


# --------------------------------------------------------------------------- helpers


def noise_image(seed: int, size: tuple[int, int] = (40, 36), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def sample_images(count: int = 6, offset: int = 0) -> list[bytes]:
    """Distinct images in several formats and modes (resized and centre-cropped to 32 px)."""
    kinds = [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("RGBA", "WEBP"), ("RGB", "BMP"),
             ("RGB", "GIF")]
    out = []
    for i in range(count):
        mode, fmt = kinds[i % len(kinds)]
        out.append(encode(noise_image(offset + i, (40 + i % 5, 36), mode), fmt))
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def reference(
    deployment: Seeded, checkpoint_id: str, images: list[bytes], layer: str, normalize: bool,
    tmp_path: Path,
) -> torch.Tensor:
    """`embed()` on the checkpoint's model, the images read from files with `load_rgb`."""
    with Session(deployment.engine) as session:
        row = session.get(Checkpoint, checkpoint_id)
        assert row is not None
        path = deployment.artifacts / row.path
    model, config = load_model(path)
    pil = []
    for i, data in enumerate(images):
        file = tmp_path / f"ref-{secrets.token_hex(4)}-{i}"
        file.write_bytes(data)
        pil.append(load_rgb(file))
    return embed(model, pil, layer, normalize, size=config.size_crops[0])  # type: ignore[arg-type]


def assert_rows(body: dict[str, Any], expected: torch.Tensor) -> None:
    assert body["object"] == "list"
    assert body["dim"] == expected.shape[1]
    assert [row["index"] for row in body["data"]] == list(range(len(expected)))
    got = torch.tensor([row["embedding"] for row in body["data"]])
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)




def stats(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/embeddings/stats")
    assert response.status_code == 200, response.text
    return dict(response.json())


def post_json(
    client: httpx.Client, model: str, images: list[bytes], **extra: Any
) -> httpx.Response:
    body = {"model": model, "input": [b64(i) for i in images], **extra}
    return client.post("/v1/embeddings", json=body)


def post_multipart(
    client: httpx.Client, model: str, images: list[bytes], **fields: str
) -> httpx.Response:
    files = [("files", (f"{i}.img", data, "application/octet-stream"))
             for i, data in enumerate(images)]
    return client.post("/v1/embeddings", files=files, data={"model": model, **fields})


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layer", ["backbone", "projection"])
def test_embeddings_equal_embed(
    deployment: Seeded, client: httpx.Client, tmp_path: Path, layer: str
) -> None:
    images = sample_images()
    for normalize in (True, False):
        response = post_json(client, deployment.final_id, images, layer=layer, normalize=normalize)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == deployment.final_id
        expected = reference(deployment, deployment.final_id, images, layer, normalize, tmp_path)
        assert_rows(body, expected)
        norms = expected.norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms)) == normalize
    assert body["dim"] == (64 if layer == "backbone" else 32)  # tiny_cnn features; feat_dim


def test_multipart_equals_json_and_job_ids_resolve(
    deployment: Seeded, client: httpx.Client, tmp_path: Path
) -> None:
    images = sample_images(5, offset=100)
    as_json = post_json(client, deployment.step_id, images, layer="projection", normalize=False)
    as_form = post_multipart(
        client, deployment.step_id, images, layer="projection", normalize="false"
    )
    assert as_json.status_code == 200 and as_form.status_code == 200, as_form.text
    assert as_form.json() == as_json.json()
    expected = reference(deployment, deployment.step_id, images, "projection", False, tmp_path)
    assert_rows(as_form.json(), expected)
    # defaults: backbone, normalised; a data URL and a lone string are accepted as input
    url = "data:image/png;base64," + b64(images[0])
    single = client.post("/v1/embeddings", json={"model": deployment.step_id, "input": url})
    assert single.status_code == 200, single.text
    assert_rows(single.json(), reference(deployment, deployment.step_id, images[:1], "backbone",
                                         True, tmp_path))

    # encoding_format base64: the rows' little-endian float32 bytes
    packed = post_json(client, deployment.step_id, images, layer="projection", normalize=False,
                       encoding_format="base64")
    assert packed.status_code == 200, packed.text
    rows = [np.frombuffer(base64.b64decode(row["embedding"]), "<f4") for row in
            packed.json()["data"]]
    assert np.array_equal(np.stack(rows), np.array(
        [row["embedding"] for row in as_json.json()["data"]], dtype=np.float32))

    # A job id means its final checkpoint, else its highest step.
    by_job = post_json(client, deployment.job_trained, images)
    assert by_job.status_code == 200, by_job.text
    assert by_job.json()["model"] == deployment.final_id
    assert by_job.json() == post_json(client, deployment.final_id, images).json()
    by_job = post_multipart(client, deployment.steps_job, images)
    assert by_job.status_code == 200, by_job.text
    assert by_job.json()["model"] == deployment.step6_id
    expected = reference(deployment, deployment.step6_id, images, "backbone", True, tmp_path)
    assert_rows(by_job.json(), expected)


def test_concurrent_requests_are_micro_batched(
    deployment: Seeded, client: httpx.Client, tmp_path: Path
) -> None:
    images = [encode(noise_image(1000 + i), "PNG") for i in range(64)]
    expected = reference(deployment, deployment.final_id, images, "backbone", True, tmp_path)
    assert post_json(client, deployment.final_id, images[:1]).status_code == 200  # loaded
    before = stats(client)

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(
            base_url=deployment.service.base_url, timeout=60, limits=limits,
            headers=deployment.service.auth_headers,
        ) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/embeddings",
                              json={"model": deployment.final_id, "input": [b64(image)]})
                    for image in images
                )
            )

    responses = asyncio.run(run())
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert_rows(response.json(), expected[i : i + 1])  # its own image's row
    after = stats(client)
    assert after["items"] - before["items"] == 64
    assert after["requests"] - before["requests"] == 64
    calls = after["model_calls"] - before["model_calls"]
    assert 1 <= calls < 64, calls  # several requests shared forward passes
    assert after["queued_items"] == 0 and after["device"] == "cpu"


def test_errors(deployment: Seeded, client: httpx.Client) -> None:
    ok = sample_images(3)
    model = deployment.final_id
    assert_error(post_json(client, "ckpt_nothing", ok), 404, "model_not_found", "model")
    assert_error(post_json(client, deployment.empty_job, ok), 409, "model_not_ready", "model")
    assert_error(post_json(client, deployment.pruned_id, ok), 410, "checkpoint_gone", "model")

    assert_error(post_json(client, model, sample_images(9)), 413, "too_many_inputs", "input")
    assert_error(post_multipart(client, model, sample_images(9)), 413, "too_many_inputs", "files")
    tiny = client.post("/v1/embeddings", json={"model": model, "input": ["AA=="] * 100_000})
    message = assert_error(tiny, 413, "too_many_inputs", "input")  # counted, not parsed
    assert "more than 8 images" in message
    big = encode(noise_image(7, (160, 160)), "PNG")  # ~77 kB of noise > 60000 bytes
    assert len(big) > 60000
    assert_error(post_json(client, model, [*ok, big]), 413, "image_too_large", "input.3")
    assert_error(post_multipart(client, model, [big]), 413, "image_too_large", "files.0")
    bomb = encode(Image.new("L", (2000, 1000)), "PNG")  # small file, 2 M pixels > 1 M
    assert len(bomb) < 60000
    message = assert_error(post_json(client, model, [bomb]), 413, "image_too_large", "input.0")
    assert "pixel" in message
    flat = encode(Image.new("L", (900, 900)), "PNG")  # 0.81 M pixels each, 2.43 M in all
    message = assert_error(post_multipart(client, model, [flat, flat, flat]), 413,
                           "request_too_large", "files")
    assert "SWAV_MAX_REQUEST_PIXELS" in message  # checked from the headers, none decoded
    assert post_multipart(client, model, [flat, flat]).status_code == 200

    tiff = encode(noise_image(3), "TIFF")
    message = assert_error(post_json(client, model, [*ok[:2], tiff]), 400, "invalid_image",
                           "input.2")
    assert "TIFF" in message
    assert_error(post_json(client, model, [ok[0], b"not an image"]), 400, "invalid_image",
                 "input.1")
    assert_error(post_json(client, model, [ok[0], ok[1][: len(ok[1]) // 2]]), 400,
                 "invalid_image", "input.1")  # truncated PNG
    bad_b64 = client.post("/v1/embeddings", json={"model": model, "input": [b64(ok[0]), "%%%"]})
    assert_error(bad_b64, 400, "invalid_image", "input.1")
    assert_error(post_multipart(client, model, [ok[0], b"GIF89a junk"]), 400, "invalid_image",
                 "files.1")

    assert_error(post_json(client, model, ok, layer="logits"), 422, "invalid_request", "layer")
    assert_error(post_json(client, model, []), 422, "invalid_request", "input")
    assert_error(client.post("/v1/embeddings", json={"input": [b64(ok[0])]}), 422,
                 "invalid_request", "model")
    no_files = client.post(
        "/v1/embeddings",
        content=b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert_error(no_files, 422, "invalid_request", "files")
    assert_error(
        client.post("/v1/embeddings", content=b"x", headers={"Content-Type": "text/plain"}),
        415, "unsupported_media_type",
    )
    huge = b'{"model": "x", "input": ["' + b"A" * 1_000_000 + b'"]}'
    response = client.post("/v1/embeddings", content=huge,
                           headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")
    assert post_json(client, model, ok).status_code == 200  # the API is still fine


def test_overload_and_cache_bounds(deployment: Seeded) -> None:
    """A second API on the same database: a 1 s batch window, 2 queued images, 1 model."""
    data_dir = deployment.service.data_dir.with_name("second")
    data_dir.mkdir()
    env = deployment.service.env | {
        "SWAV_DATA_DIR": str(data_dir),
        "SWAV_ARTIFACTS_DIR": str(deployment.artifacts),
        "SWAV_EMBED_BATCH_WINDOW_MS": "1000",
        "SWAV_EMBED_MAX_QUEUE_ITEMS": "2",
        "SWAV_EMBED_CACHE_MODELS": "1",
    }
    service = Service(env, data_dir)
    try:
        service.start_api()
        images = sample_images(2)
        with service.client() as client:
            for model in (deployment.final_id, deployment.step_id, deployment.final_id):
                assert post_json(client, model, images[:1]).status_code == 200
            counters = stats(client)
            assert counters["loads"] == 3 and counters["evictions"] == 2
            assert counters["cached_models"] == 1 and counters["cached_bytes"] > 0

            results: list[httpx.Response] = []
            first = threading.Thread(
                target=lambda: results.append(post_json(client, deployment.final_id, images))
            )
            first.start()
            deadline = time.monotonic() + 30
            while stats(client)["queued_items"] < 2:  # waiting in the 1 s window
                assert time.monotonic() < deadline, "the first request never queued"
                time.sleep(0.02)
            # A valid header and broken pixels: refused before decoding (decoding it would
            # have answered 400 invalid_image).
            truncated = images[0][: len(images[0]) // 2]
            refused = post_json(client, deployment.final_id, [truncated])
            assert_error(refused, 503, "overloaded")
            assert refused.headers["Retry-After"] == "1"
            first.join()
            assert results[0].status_code == 200, results[0].text
            assert stats(client)["overloaded"] == 1
    finally:
        service.stop()


def test_batcher_groups_requests_without_splitting_them() -> None:
    """In process: one forward per window, never more than max_batch images unless one
    request alone is larger, rows back to their own request, errors to every request."""
    from concurrent.futures import ThreadPoolExecutor

    from api.batcher import Batcher, Overloaded, Stats

    calls: list[int] = []

    def run(batches: list[list[torch.Tensor]]) -> torch.Tensor:
        parts = [part for batch in batches for part in batch]
        calls.append(sum(len(p) for p in parts))
        if any(bool((p < 0).any()) for p in parts):
            raise ValueError("negative input")
        return torch.cat(parts) * 2

    async def scenario() -> None:
        stats = Stats()
        with ThreadPoolExecutor(1) as executor:
            batcher = Batcher(run, executor, stats, window_s=0.05, max_batch=4, max_queue=8)
            sizes = [1, 2, 1, 3, 1]  # 4 | 3 1 (no split) | ... grouped in arrival order
            inputs = [torch.full((n, 1), float(i)) for i, n in enumerate(sizes)]
            outputs = await asyncio.gather(*(batcher.submit([x]) for x in inputs))
            for x, out in zip(inputs, outputs, strict=True):
                assert torch.equal(out, x * 2)
            assert calls == [4, 4] and stats.model_calls == 2 and stats.items == 8
            calls.clear()
            big = await batcher.submit([torch.ones(6, 1)])  # alone over max_batch: one call
            assert calls == [6] and big.shape == (6, 1)
            calls.clear()
            results = await asyncio.gather(
                batcher.submit([torch.ones(1, 1)]),
                batcher.submit([-torch.ones(1, 1)]),
                return_exceptions=True,
            )
            assert calls == [2] and all(isinstance(r, ValueError) for r in results)
            waiting = [asyncio.ensure_future(batcher.submit([torch.ones(4, 1)])) for _ in "ab"]
            await asyncio.sleep(0)
            with pytest.raises(Overloaded):
                await batcher.submit([torch.ones(1, 1)])  # 8 images already wait
            assert all(out.shape == (4, 1) for out in await asyncio.gather(*waiting))

    asyncio.run(scenario())
