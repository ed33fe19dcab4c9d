"""The HTTP API over real HTTP: a `swav-service api` uvicorn process on a migrated PostgreSQL
database, with Redis as the broker. No worker runs: the broker messages stay in Redis, and
the states a worker would write (a ready dataset, events, checkpoints) are written straight
into the same database with the service's own models.

Most tests share one API process (`api`, module scope) and each makes its own datasets and
jobs; tests that need an empty database or other settings use `pg_service`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from swav_service.db import make_engine
from swav_service.job_state import append_event, change_status
from swav_service.models import Checkpoint, Dataset, EmbeddingJob, Job, new_id
from swav_service.settings import Settings
from tests.api.conftest import Deployment, assert_error
from tests.conftest import Service

_ENGINES: dict[str, Engine] = {}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_POLL_INTERVAL_S": "0.05", "SWAV_MAX_NUM_WORKERS": "8"}


@pytest.fixture(scope="module")
def api(deployment: Deployment) -> Iterator[Service]:
    """The API the module's tests share (tests/api/conftest.py); `db(api)` writes to its
    database with the deployment's engine."""
    url = deployment.service.env["SWAV_DATABASE_URL"]
    _ENGINES[url] = deployment.engine
    yield deployment.service
    _ENGINES.pop(url, None)


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


@contextmanager
def db(service: Service) -> Iterator[Session]:
    """A session on the service's database that commits at the end of the block."""
    url = service.env["SWAV_DATABASE_URL"]
    if url not in _ENGINES:
        _ENGINES[url] = make_engine(url)
    with Session(_ENGINES[url], expire_on_commit=False) as session:
        yield session
        session.commit()


def dispose_engine(service: Service) -> None:
    engine = _ENGINES.pop(service.env["SWAV_DATABASE_URL"], None)
    if engine is not None:
        engine.dispose()


def settings_of(service: Service) -> Settings:
    """The paths the API process uses (its env sets only SWAV_DATA_DIR among them)."""
    return Settings.model_validate(
        {"data_dir": service.data_dir, "artifacts_dir": service.data_dir / "artifacts"}
    )


def broker_length(service: Service, queue: str) -> int:
    """Messages waiting in a Redis queue (kombu keeps each queue as a list of its name)."""
    return int(redis.Redis.from_url(service.env["SWAV_BROKER_URL"]).llen(queue))


def add_dataset(service: Service, status: str = "ready", tenant: str = "local") -> str:
    dataset_id = new_id("ds")
    with db(service) as session:
        session.add(
            Dataset(
                id=dataset_id,
                tenant=tenant,
                name="shapes",
                status=status,
                archive_bytes=1000,
                num_images=128 if status == "ready" else None,
                num_skipped=0 if status == "ready" else None,
                classes=["a", "b"] if status == "ready" else None,
            )
        )
    return dataset_id


def create_job(client: httpx.Client, dataset_id: str, **extra: Any) -> dict[str, Any]:
    body = {"dataset_id": dataset_id, "preset": "cpu-tiny", "config": {"epochs": 2}, **extra}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def set_job(service: Service, job_id: str, **values: Any) -> None:
    with db(service) as session:
        job = session.get(Job, job_id)
        assert job is not None
        for key, value in values.items():
            setattr(job, key, value)


def zip_bytes(marker: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("shapes/a/0.txt", b"not really an image " + marker)
    return buffer.getvalue()




def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    """A multipart/form-data body from (field name, file name or None, content) parts."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def dataset_dirs(service: Service) -> set[str]:
    root = settings_of(service).artifacts / "datasets"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


# --------------------------------------------------------------------------- health, errors


def test_health_readiness_and_unknown_routes(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.delete("/v1/jobs"), 405, "method_not_allowed")
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs/{job_id}/events" in client.get("/openapi.json").json()["paths"]


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with its $ref (directly or as the one allOf entry) followed."""
    ref = schema.get("$ref") or next((s["$ref"] for s in schema.get("allOf", [])), None)
    if ref is None:
        return schema
    name = ref.rsplit("/", 1)[-1]
    resolved: dict[str, Any] = spec["components"]["schemas"][name]
    return resolved


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    assert len(options) == 1, schema
    return options[0]


BOUND_KEYS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


@pytest.mark.parametrize("path", ["/", "/dashboard/index.html", "/dashboard/app.js"])
def test_every_dashboard_file_is_served_unframeable_and_script_locked(
    client: httpx.Client, path: str
) -> None:
    response = client.get(path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_openapi_documents_every_config_field_bound_preset_and_status(
    client: httpx.Client,
) -> None:
    """Generated clients see the whole contract: every TrainConfig field with its
    description and bounds, the presets and the statuses, read from /openapi.json; a job
    answers its config as the full TrainConfig, version included."""
    from swav_core.config import SETTABLE_FIELDS, TrainConfig
    from swav_core.presets import PRESETS
    from swav_service.models import DATASET_STATUSES, JOB_STATUSES

    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    job_create = schemas["JobCreate"]["properties"]
    config = _resolved(spec, job_create["config"])
    assert config.get("additionalProperties") is False
    assert set(config["properties"]) == set(SETTABLE_FIELDS)
    assert set(TrainConfig.model_fields) == {*SETTABLE_FIELDS, "config_version"}
    shown = _resolved(spec, schemas["JobPublic"]["properties"]["config"])
    assert set(shown["properties"]) == set(TrainConfig.model_fields)
    bounds_seen = 0
    for name in SETTABLE_FIELDS:
        info = TrainConfig.model_fields[name]
        documented = config["properties"][name]
        assert documented.get("description") == info.description, name
        value_schema = _non_null(documented)
        for constraint in info.metadata:
            for attr, key in BOUND_KEYS.items():
                if getattr(constraint, attr, None) is not None:
                    assert value_schema[key] == getattr(constraint, attr), (name, key)
                    bounds_seen += 1
    assert bounds_seen >= 10  # the config has bounds, and they are all documented
    assert set(_non_null(job_create["preset"])["enum"]) == {"auto", *PRESETS}
    assert set(schemas["JobPublic"]["properties"]["status"]["enum"]) == set(JOB_STATUSES)
    assert set(schemas["DatasetPublic"]["properties"]["status"]["enum"]) == set(DATASET_STATUSES)


def test_unexpected_and_engine_errors_use_the_envelope() -> None:
    """In process: routes that raise are answered with the envelope and no stack trace."""
    from api.main import create_app
    from swav_core.errors import ConfigError

    app = create_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail in a stack frame")

    @app.get("/engine")
    def engine() -> None:
        raise ConfigError("batch_size=30 is not divisible by world_size=4")

    async def get(path: str) -> httpx.Response:
        # The server error middleware answers, then re-raises for the server's log.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as local:
            return await local.get(path)

    response = asyncio.run(get("/boom"))
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "internal",
            "message": "internal server error; the server log has details",
            "param": None,
        }
    }
    assert "secret" not in response.text and "Traceback" not in response.text
    message = assert_error(asyncio.run(get("/engine")), 422, "invalid_config")
    assert "world_size=4" in message


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", "/v1/datasets/ds_missing", "dataset_id"),
        ("DELETE", "/v1/datasets/ds_missing", "dataset_id"),
        ("GET", "/v1/jobs/job_missing", "job_id"),
        ("POST", "/v1/jobs/job_missing/cancel", "job_id"),
        ("POST", "/v1/jobs/job_missing/resume", "job_id"),
        ("GET", "/v1/jobs/job_missing/events", "job_id"),
        ("GET", "/v1/jobs/job_missing/checkpoints", "job_id"),
        ("GET", "/v1/checkpoints/ckpt_missing", "checkpoint_id"),
        ("GET", "/v1/checkpoints/ckpt_missing/download", "checkpoint_id"),
    ],
)
def test_unknown_ids_are_404(client: httpx.Client, method: str, path: str, param: str) -> None:
    message = assert_error(client.request(method, path), 404, "not_found", param)
    assert "missing" in message


def test_other_tenants_rows_are_invisible(api: Service, client: httpx.Client) -> None:
    foreign = add_dataset(api, tenant="someone-else")
    assert_error(client.get(f"/v1/datasets/{foreign}"), 404, "not_found", "dataset_id")
    listed = client.get("/v1/datasets", params={"limit": 200}).json()["data"]
    assert foreign not in {d["id"] for d in listed}
    response = client.post("/v1/jobs", json={"dataset_id": foreign, "preset": "cpu-tiny"})
    assert_error(response, 404, "not_found", "dataset_id")


def test_list_parameters_are_validated(client: httpx.Client) -> None:
    for limit in (0, 201):
        message = assert_error(
            client.get("/v1/jobs", params={"limit": limit}), 422, "invalid_request", "limit"
        )
        assert message.startswith("limit: ")
    for cursor in ("not-base64!", "bm90IGpzb24", "WzEsMiwzXQ"):  # junk, "not json", [1,2,3]
        response = client.get("/v1/datasets", params={"cursor": cursor})
        assert_error(response, 400, "invalid_cursor", "cursor")
    message = assert_error(
        client.get("/v1/jobs", params={"status": "sleeping"}), 422, "invalid_request", "status"
    )
    assert "'sleeping' is not a job status" in message and "cancelled" in message


# --------------------------------------------------------------------------- datasets


def test_upload_is_accepted_and_stored(api: Service, client: httpx.Client) -> None:
    archive = zip_bytes()
    before = broker_length(api, "short")
    response = client.post(
        "/v1/datasets",
        files={"file": ("shapes.zip", archive, "application/zip")},
        data={"name": "my shapes"},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["name"] == "my shapes" and created["status"] == "validating"
    assert created["archive_bytes"] == len(archive)
    stored = settings_of(api).dataset_dir(created["id"]) / "upload.zip"
    assert stored.read_bytes() == archive
    assert broker_length(api, "short") == before + 1  # enqueue_ingest sent the task

    fetched = client.get(f"/v1/datasets/{created['id']}")
    assert fetched.status_code == 200 and fetched.json() == created
    listed = client.get("/v1/datasets").json()
    assert listed["data"][0] == created

    # Without `name` the file name's stem is used, whatever the archive type.
    tarball = client.post("/v1/datasets", files={"file": ("my-images.tar.gz", b"\x1f\x8b...")})
    assert tarball.status_code == 202 and tarball.json()["name"] == "my-images"
    assert (settings_of(api).dataset_dir(tarball.json()["id"]) / "upload.tar.gz").exists()


def test_upload_rejections(api: Service, client: httpx.Client) -> None:
    before = dataset_dirs(api)
    marker = b"UPLOADED-BYTES-MARKER"

    response = client.post("/v1/datasets", json={"file": "shapes.zip"})
    assert_error(response, 415, "unsupported_media_type")
    response = client.post("/v1/datasets", data={"name": "x"})  # urlencoded form
    assert_error(response, 415, "unsupported_media_type")

    response = client.post("/v1/datasets", files={"file": ("shapes.rar", zip_bytes(marker))})
    message = assert_error(response, 415, "unsupported_archive", "file")
    assert ".zip" in message and ".tar.gz" in message
    assert marker.decode() not in response.text

    response = client.post("/v1/datasets", files={"file": ("shapes.zip", b"")})
    assert_error(response, 422, "empty_archive", "file")

    boundary = "testboundary"
    body = multipart_body([("name", None, b"only a name")], boundary)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/v1/datasets", content=body, headers=headers)
    assert_error(response, 422, "invalid_request", "file")

    truncated = multipart_body([("file", "a.zip", zip_bytes(marker))], boundary)[:-30]
    response = client.post("/v1/datasets", content=truncated, headers=headers)
    assert_error(response, 400, "invalid_multipart")
    assert marker.decode() not in response.text

    assert dataset_dirs(api) == before  # no partial upload left behind


def test_delete_dataset(api: Service, client: httpx.Client) -> None:
    unused = add_dataset(api)
    folder = settings_of(api).dataset_dir(unused)
    (folder / "images").mkdir(parents=True)
    (folder / "upload.zip").write_bytes(b"x")
    assert client.delete(f"/v1/datasets/{unused}").status_code == 204
    assert not folder.exists()
    assert_error(client.get(f"/v1/datasets/{unused}"), 404, "not_found", "dataset_id")
    with db(api) as session:
        assert session.get(Dataset, unused) is None

    validating = add_dataset(api, status="validating")
    response = client.delete(f"/v1/datasets/{validating}")
    assert_error(response, 409, "dataset_in_use", "dataset_id")

    used = add_dataset(api)
    job = create_job(client, used)
    message = assert_error(
        client.delete(f"/v1/datasets/{used}"), 409, "dataset_in_use", "dataset_id"
    )
    assert job["id"] in message and "queued" in message
    client.post(f"/v1/jobs/{job['id']}/cancel")
    # A finished job still refers to it: the files go, the row stays hidden as `deleted`.
    assert client.delete(f"/v1/datasets/{used}").status_code == 204
    assert_error(client.get(f"/v1/datasets/{used}"), 404, "not_found", "dataset_id")
    with db(api) as session:
        assert session.get(Dataset, used).status == "deleted"  # type: ignore[union-attr]
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    response = client.post(f"/v1/jobs/{job['id']}/resume")
    assert_error(response, 409, "dataset_not_ready", "dataset_id")
    response = client.post("/v1/jobs", json={"dataset_id": used, "preset": "cpu-tiny"})
    assert_error(response, 404, "not_found", "dataset_id")


def test_delete_a_dataset_that_embedding_jobs_used(api: Service, client: httpx.Client) -> None:
    """An embedding job refers to the dataset it embedded: a running one keeps it (409), a
    finished one keeps its row hidden as `deleted` (before: a foreign-key error, a 500)."""
    job = create_job(client, add_dataset(api))
    embedded = add_dataset(api)
    checkpoint_id, embedding_id = new_id("ckpt"), new_id("emb")
    with db(api) as session:
        session.add(Checkpoint(id=checkpoint_id, job_id=job["id"], step=1, epoch=0,
                               path="x.pt", size_bytes=1, sha256="0" * 64))
        session.flush()
        session.add(EmbeddingJob(id=embedding_id, tenant="local", job_id=job["id"],
                                 checkpoint_id=checkpoint_id, dataset_id=embedded,
                                 layer="backbone", status="running"))
    message = assert_error(
        client.delete(f"/v1/datasets/{embedded}"), 409, "dataset_in_use", "dataset_id"
    )
    assert embedding_id in message and "running" in message
    with db(api) as session:
        row = session.get(EmbeddingJob, embedding_id)
        assert row is not None
        row.status = "succeeded"
    assert client.delete(f"/v1/datasets/{embedded}").status_code == 204
    assert_error(client.get(f"/v1/datasets/{embedded}"), 404, "not_found", "dataset_id")
    with db(api) as session:
        assert session.get(Dataset, embedded).status == "deleted"  # type: ignore[union-attr]


def test_upload_size_cap(pg_service: Service) -> None:
    pg_service.env["SWAV_MAX_UPLOAD_BYTES"] = "2000"
    pg_service.start_api()
    boundary = "capboundary"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with pg_service.client() as client:
        # Refused from the Content-Length alone (100 kB > the cap plus multipart framing).
        body = multipart_body([("file", "big.zip", b"z" * 100_000)], boundary)
        message = assert_error(
            client.post("/v1/datasets", content=body, headers=headers),
            413,
            "payload_too_large",
            "file",
        )
        assert "2000 bytes" in message

    def chunked(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    # No Content-Length (chunked): the archive bytes are counted as they stream in.
    for size in (2001, 5_000_000):
        with pg_service.client() as client:
            body = multipart_body([("file", "big.zip", b"z" * size)], boundary)
            response = client.post("/v1/datasets", content=chunked(body), headers=headers)
            assert "content-length" not in response.request.headers
            assert_error(response, 413, "payload_too_large", "file")

    with pg_service.client() as client:
        assert dataset_dirs(pg_service) == set()  # partial files were deleted
        assert client.get("/v1/datasets").json()["data"] == []
        response = client.post("/v1/datasets", files={"file": ("ok.zip", b"k" * 2000)})
        assert response.status_code == 202, response.text  # exactly the cap is allowed
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_broker_down(pg_service: Service) -> None:
    pg_service.env["SWAV_BROKER_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there
    pg_service.start_api()
    with pg_service.client() as client:
        message = assert_error(client.get("/readyz"), 503, "not_ready")
        assert "broker" in message and "database" not in message
        assert "127.0.0.1" not in message and "Error" not in message  # the cause is logged
        response = client.post("/v1/datasets", files={"file": ("a.zip", zip_bytes())})
        assert_error(response, 503, "broker_unavailable")
        (dataset,) = client.get("/v1/datasets").json()["data"]
        assert dataset["status"] == "failed"
        assert dataset["error"]["code"] == "broker_unavailable"

        ready = add_dataset(pg_service)
        response = client.post("/v1/jobs", json={"dataset_id": ready, "preset": "cpu-tiny"})
        assert_error(response, 503, "broker_unavailable")
        (job,) = client.get("/v1/jobs").json()["data"]
        assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"
    dispose_engine(pg_service)


# --------------------------------------------------------------------------- jobs


@pytest.mark.parametrize(
    ("body", "param", "phrase"),
    [
        ({"preset": "cpu-tiny", "config": {"n_prototypes": 1}}, "config.n_prototypes", "2"),
        ({"preset": "cpu-tiny", "config": {"epsilon": 0}}, "config.epsilon", "greater than 0"),
        ({"preset": "cpu-tiny", "config": {"queue_length": 100}}, "config.queue_length", "96"),
        ({"config": {"learning_rate": 0.1}}, "config.learning_rate", "unknown field"),
        ({"config": {"preset": "cpu-tiny"}}, "config.preset", "unknown field"),
        ({"preset": "huge"}, "preset", "cpu-tiny"),
        ({"config": {"n_crops": [2, 6], "size_crops": [224]}}, "config.size_crops", "1 entries"),
        ({"preset": "cpu-tiny", "config": {"backbone": "resnet5"}}, "config.backbone",
         "unknown backbone 'resnet5'; did you mean resnet50"),
        # What a deployment allows (swav_service/config_limits.py), each with its setting.
        ({"preset": "cpu-tiny", "config": {"size_crops": [8192, 24]}}, "config.size_crops",
         "a crop side of 8192 px is more than this deployment allows (at most 1024; the "
         "setting SWAV_MAX_CROP_PX)"),
        ({"preset": "cpu-tiny", "config": {"num_workers": 9}}, "config.num_workers",
         "(at most 8; the setting SWAV_MAX_NUM_WORKERS)"),
        ({"preset": "cpu-tiny", "config": {"epochs": 2**31}}, "config.epochs",
         "SWAV_MAX_TOTAL_STEPS"),
        ({"preset": "cpu-tiny", "config": {"epochs": 30_000_000}}, "config.epochs",
         "120000000 steps in all"),  # 128 images / batch 32 = 4 steps per epoch
        ({"preset": "cpu-tiny", "config": {"n_crops": [2, 40], "size_crops": [32, 24],
          "min_scale_crops": [0.4, 0.2], "max_scale_crops": [1.0, 0.5]}}, "config.n_crops",
         "42 crops per image"),
        ({"preset": "cpu-tiny", "config": {"checkpoint_every_steps": 1, "epochs": 5000}},
         "config.checkpoint_every_steps", "SWAV_MAX_CHECKPOINTS_PER_JOB"),
        ({"preset": "cpu-tiny", "config": {"sinkhorn_iterations": 10_000}},
         "config.sinkhorn_iterations", "SWAV_MAX_SINKHORN_ITERATIONS"),
    ],
)
def test_invalid_config_is_422(
    api: Service, client: httpx.Client, body: dict[str, Any], param: str, phrase: str
) -> None:
    dataset_id = add_dataset(api)
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, **body})
    message = assert_error(response, 422, "invalid_config", param)
    assert message.startswith(f"{param}: ") and phrase in message
    with db(api) as session:
        assert session.scalar(select(func.count()).where(Job.dataset_id == dataset_id)) == 0


def test_a_config_at_the_deployments_limit_is_accepted(api: Service, client: httpx.Client) -> None:
    """The bound is the setting's value (SWAV_MAX_NUM_WORKERS=8 in this module), inclusive."""
    body = {"dataset_id": add_dataset(api), "preset": "cpu-tiny", "dry_run": True,
            "config": {"num_workers": 8, "size_crops": [1024, 24]}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["config"]["num_workers"] == 8


def test_invalid_job_requests(api: Service, client: httpx.Client) -> None:
    ready = add_dataset(api)
    response = client.post("/v1/jobs", json={"dataset_id": ready, "foo": 1})
    assert "unknown field" in assert_error(response, 422, "invalid_request", "foo")
    response = client.post("/v1/jobs", json={"preset": "cpu-tiny"})
    assert assert_error(response, 422, "invalid_request", "dataset_id").endswith("required")
    response = client.post("/v1/jobs", json={"dataset_id": ready, "config": [1, 2]})
    assert_error(response, 422, "invalid_request", "config")
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")
    long_name = "n" * 5000
    response = client.post("/v1/jobs", json={"dataset_id": ready, "name": long_name})
    assert_error(response, 422, "invalid_request", "name")
    assert long_name not in response.text  # inputs are never echoed

    response = client.post("/v1/jobs", json={"dataset_id": "ds_nope", "preset": "cpu-tiny"})
    assert_error(response, 404, "not_found", "dataset_id")
    for status in ("validating", "failed"):
        dataset_id = add_dataset(api, status=status)
        response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "preset": "cpu-tiny"})
        assert status in assert_error(response, 409, "dataset_not_ready", "dataset_id")


def test_create_job(api: Service, client: httpx.Client) -> None:
    from swav_core.presets import config_from

    dataset_id = add_dataset(api)
    before = broker_length(api, "train")
    job = create_job(client, dataset_id, name="run 1", metadata={"owner": "me", "tags": [1]})
    assert job["status"] == "queued" and job["name"] == "run 1" and job["dataset_id"] == dataset_id
    assert job["config"] == config_from("cpu-tiny", epochs=2).model_dump(mode="json")
    assert job["progress"] == {"step": 0, "total_steps": None, "epoch": 0, "epochs": 2}
    assert job["metadata"] == {"owner": "me", "tags": [1]}
    assert job["attempt"] == 0 and job["error"] is None and job["compute_seconds"] == 0
    assert job["started_at"] is None and job["finished_at"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    assert broker_length(api, "train") == before + 1  # enqueue_job sent the task
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["seq"], e["type"], e["data"]) for e in events["data"]] == [
        (1, "state", {"status": "queued"})
    ]


def test_a_job_stored_before_a_config_rename_is_shown_with_the_new_name(
    api: Service, client: httpx.Client
) -> None:
    """A config written by version 1 (`nmb_crops`, no `config_version`) reads as the current
    version: the row is not migrated, the API answers the current names."""
    job = create_job(client, add_dataset(api))
    stored = {k: v for k, v in job["config"].items() if k != "config_version"}
    stored["nmb_crops"] = stored.pop("n_crops")
    set_job(api, job["id"], config=stored)
    shown = client.get(f"/v1/jobs/{job['id']}").json()["config"]
    assert shown == job["config"]
    assert (shown["config_version"], shown["n_crops"]) == (2, [2, 2])


def test_idempotency_key(api: Service, client: httpx.Client) -> None:
    dataset_id = add_dataset(api)
    body = {"dataset_id": dataset_id, "preset": "cpu-tiny", "name": "once"}
    headers = {"Idempotency-Key": f"key-{secrets.token_hex(4)}"}
    before = broker_length(api, "train")
    first = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201
    set_job(api, first.json()["id"], status="running")  # the replay is of the first answer
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 201 and again.json() == first.json()
    with db(api) as session:
        assert session.scalar(select(func.count()).where(Job.dataset_id == dataset_id)) == 1
    assert broker_length(api, "train") == before + 1

    response = client.post("/v1/jobs", json={**body, "name": "other"}, headers=headers)
    assert_error(response, 409, "idempotency_conflict", "Idempotency-Key")
    other = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "another"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_pagination_and_status_filter(pg_service: Service) -> None:
    pg_service.start_api()
    dataset_id = add_dataset(pg_service)
    with pg_service.client() as client:
        created = [create_job(client, dataset_id, name=f"job {i}")["id"] for i in range(5)]
        pages: list[list[str]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/jobs", params=params).json()
            pages.append([j["id"] for j in page["data"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [i for p in pages for i in p] == created[::-1]  # newest first, no repeats

        for job_id in created[:2]:
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

        def ids(status: str) -> list[str]:
            page = client.get("/v1/jobs", params={"status": status})
            assert page.status_code == 200, page.text
            return [j["id"] for j in page.json()["data"]]

        assert ids("cancelled") == created[1::-1]
        assert ids("queued") == created[:1:-1]
        assert ids("queued,cancelled") == created[::-1]
        assert ids("running") == []

        first = client.get("/v1/datasets", params={"limit": 1}).json()
        assert [d["id"] for d in first["data"]] == [dataset_id] and first["next_cursor"] is None
    dispose_engine(pg_service)


def test_cancel_and_resume(api: Service, client: httpx.Client) -> None:
    dataset_id = add_dataset(api)
    job_id = create_job(client, dataset_id)["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    message = assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished", "job_id")
    assert "cancelled" in message

    before = broker_length(api, "train")
    resumed = client.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 202
    assert resumed.json()["status"] == "queued" and resumed.json()["finished_at"] is None
    assert broker_length(api, "train") == before + 1
    response = client.post(f"/v1/jobs/{job_id}/resume")
    assert_error(response, 409, "job_not_resumable", "job_id")
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"] for e in events] == [
        {"status": "queued"},
        {"status": "cancelled"},
        {"status": "queued", "resumed": True},
    ]

    # A running job is asked to stop; the worker finishes the cancel.
    set_job(api, job_id, status="running")
    cancelling = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelling.status_code == 202 and cancelling.json()["status"] == "cancelling"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "cancelling"
    with db(api) as session:
        assert session.get(Job, job_id).cancel_requested_at is not None  # type: ignore[union-attr]

    set_job(api, job_id, status="failed", error_code="worker_lost", error_message="died",
            attempt=3, max_attempts=3)
    assert client.get(f"/v1/jobs/{job_id}").json()["error"] == {
        "code": "worker_lost",
        "message": "died",
    }
    resumed = client.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 202 and resumed.json()["error"] is None
    assert resumed.json()["attempt"] == 0  # a fresh budget: its next crash is retried

    set_job(api, job_id, status="succeeded")
    assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 409, "job_not_resumable", "job_id")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished", "job_id")


# --------------------------------------------------------------------------- events


def read_sse(response: httpx.Response) -> Iterator[tuple[dict[str, str], float]]:
    """(fields of one SSE message, arrival time) until the server ends the stream."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                yield fields, time.monotonic()
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value


def test_events_pages(api: Service, client: httpx.Client) -> None:
    job_id = create_job(client, add_dataset(api))["id"]
    with db(api) as session:
        for step in range(1, 7):
            append_event(session, job_id, "metrics", {"step": step})
    seqs, after = [], None
    while True:
        params = {"limit": 3} | ({"after": after} if after else {})
        page = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
        seqs.append([e["seq"] for e in page["data"]])
        after = page["next_cursor"]
        if after is None:
            break
    assert seqs == [[1, 2, 3], [4, 5, 6], [7]]
    page = client.get(f"/v1/jobs/{job_id}/events", params={"after": 5}).json()
    assert [e["data"] for e in page["data"]] == [{"step": 5}, {"step": 6}]
    assert set(page["data"][0]) == {"seq", "type", "data", "created_at"}
    response = client.get(f"/v1/jobs/{job_id}/events", params={"after": -1})
    assert_error(response, 422, "invalid_request", "after")


def test_event_stream(api: Service, client: httpx.Client) -> None:
    job_id = create_job(client, add_dataset(api))["id"]  # event 1: state queued
    finished_at: list[float] = []

    def worker() -> None:
        for step in range(1, 6):  # events 2..6
            time.sleep(0.1)
            with db(api) as session:
                append_event(session, job_id, "metrics", {"step": step})
        with db(api) as session:  # event 7
            assert change_status(session, job_id, "succeeded", expected=("queued",))
        finished_at.append(time.monotonic())

    thread = threading.Thread(target=worker)
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        thread.start()
        received = list(read_sse(response))  # returns only because the server ends it
    thread.join()

    messages = [m for m, _ in received]
    assert [int(m["id"]) for m in messages] == list(range(1, 8))
    assert [m["event"] for m in messages] == ["state"] + ["metrics"] * 5 + ["state"]
    data = [json.loads(m["data"]) for m in messages]
    assert [d["seq"] for d in data] == list(range(1, 8))
    assert [d["data"].get("step") for d in data[1:6]] == [1, 2, 3, 4, 5]
    assert data[-1]["data"] == {"status": "succeeded"}
    assert received[1][1] < finished_at[0]  # live: the first metric came before the end

    # Reconnecting with Last-Event-ID resumes after it (and wins over `after`).
    headers["Last-Event-ID"] = "4"
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, params={"after": 1}
    ) as response:
        assert [int(m["id"]) for m, _ in read_sse(response)] == [5, 6, 7]
    with client.stream(
        "GET",
        f"/v1/jobs/{job_id}/events",
        headers={"Accept": "text/event-stream"},
        params={"after": 6},
    ) as response:
        assert [m["event"] for m, _ in read_sse(response)] == ["state"]


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_downloads(api: Service, client: httpx.Client, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load as load_safetensors

    from swav_core.checkpoint import save_checkpoint
    from swav_core.config import TrainConfig
    from swav_core.model import SwAVModel
    from swav_core.presets import config_from

    settings = settings_of(api)
    job_id = create_job(client, add_dataset(api))["id"]
    config = config_from("cpu-tiny")
    model = SwAVModel.from_config(config)
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
    info = save_checkpoint(settings.job_dir(job_id) / "run", state, step=8, keep_last=2, final=True)
    assert info.sha256 is not None and info.size is not None
    final_id, pruned_id, missing_id = new_id("ckpt"), new_id("ckpt"), new_id("ckpt")
    with db(api) as session:
        common = {"job_id": job_id, "epoch": 1, "sha256": info.sha256, "size_bytes": info.size}
        relative = str(info.path.relative_to(settings.artifacts))
        session.add(
            Checkpoint(
                id=pruned_id,
                step=4,
                final=False,
                available=False,
                path=relative.replace("final", "step-4"),
                **common,
            )
        )
        session.flush()
        session.add(
            Checkpoint(
                id=missing_id,
                step=6,
                final=False,
                available=True,
                path=relative.replace("final", "step-6"),
                **common,
            )
        )
        session.flush()
        session.add(
            Checkpoint(
                id=final_id, step=8, final=True, path=relative, metrics={"loss": 2.5}, **common
            )
        )

    listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert [c["id"] for c in listed["data"]] == [final_id, missing_id]  # pruned ones hidden
    final = listed["data"][0]
    assert final == client.get(f"/v1/checkpoints/{final_id}").json()
    assert final["sha256"] == info.sha256 and final["metrics"] == {"loss": 2.5}

    url = f"/v1/checkpoints/{final_id}/download"
    full = client.get(url, params={"format": "full"})
    assert full.status_code == 200
    assert hashlib.sha256(full.content).hexdigest() == full.headers["X-Checksum-SHA256"]
    assert full.headers["X-Checksum-SHA256"] == info.sha256 and len(full.content) == info.size
    assert client.get(url).content == full.content  # `full` is the default

    exported = client.get(url, params={"format": "safetensors"})
    assert exported.status_code == 200, exported.text
    assert hashlib.sha256(exported.content).hexdigest() == exported.headers["X-Checksum-SHA256"]
    tensors = load_safetensors(exported.content)
    assert set(tensors) == set(model.state_dict())
    assert all((tensors[k] == v).all() for k, v in model.state_dict().items())
    (tmp_path / "model.safetensors").write_bytes(exported.content)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as file:
        assert TrainConfig.model_validate_json(file.metadata()["swav_config"]) == config
    assert info.path.with_name("final.model.safetensors").is_file()  # cached beside it

    backbone = client.get(url, params={"format": "backbone"})
    assert backbone.status_code == 200, backbone.text
    fresh = SwAVModel.from_config(config).backbone
    fresh.load_state_dict(load_safetensors(backbone.content), strict=True)
    assert info.path.with_name("final.backbone.safetensors").is_file()

    message = assert_error(
        client.get(url, params={"format": "onnx"}), 422, "invalid_request", "format"
    )
    assert "onnx" not in message
    for gone in (pruned_id, missing_id):
        response = client.get(f"/v1/checkpoints/{gone}/download")
        assert_error(response, 410, "checkpoint_gone", "checkpoint_id")


def test_readiness_in_embedded_mode(embedded_service: Service) -> None:
    """SQLite and Celery's filesystem transport: ready while the broker folder is writable."""
    embedded_service.start_api()
    with embedded_service.client() as client:
        assert client.get("/readyz").json() == {
            "status": "ready",
            "database": "ok",
            "broker": "ok",
        }
        queue = embedded_service.data_dir / "broker" / "queue"
        queue.rename(queue.with_name("moved"))
        message = assert_error(client.get("/readyz"), 503, "not_ready")
        assert message.startswith("not ready: the broker is unreachable")
        assert "database" not in message and str(queue) not in message  # no server path
