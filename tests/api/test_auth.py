"""API keys, tenant isolation and per-tenant limits over real HTTP.

One `swav-service api` process on a migrated PostgreSQL database with Redis as the broker
(no worker: queued jobs stay queued), keys made with the real `swav-service create-key`,
and rows a worker would write inserted straight into the database. Limits are per
tenant, so each test works in tenants of its own and the module's low limits
(`LIMITS`) bind only where a test pushes one tenant against them.
"""

from __future__ import annotations

import hashlib
import io
import re
import secrets
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from swav_service.models import ApiKey, Checkpoint, Dataset, EmbeddingJob, Job, Weights, new_id
from swav_service.quota import human_bytes
from tests.api.conftest import Deployment, assert_error
from tests.conftest import Service

LIMITS = {
    "SWAV_TENANT_MAX_ACTIVE_JOBS": "2",
    "SWAV_TENANT_MAX_STORED_BYTES": "100000",
    "SWAV_TENANT_EMBED_RATE_PER_S": "1",
    "SWAV_TENANT_EMBED_BURST": "5",
    "SWAV_TENANT_THUMBNAILS_PER_S": "1",
    "SWAV_TENANT_THUMBNAILS_BURST": "3",
}
UNAUTHORIZED = {
    "error": {
        "code": "unauthorized",
        "message": "a valid API key is required: send `Authorization: Bearer <key>` (create "
        "one with `swav-service create-key --tenant NAME`)",
        "param": None,
    }
}
PUBLIC = {"/healthz", "/readyz", "/metrics"}  # probes and scrapes carry no key
KEY_PATTERN = re.compile(r"swav_[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return LIMITS


@contextmanager
def db(deployment: Deployment) -> Iterator[Session]:
    with Session(deployment.engine, expire_on_commit=False) as session:
        yield session
        session.commit()




@dataclass
class Owned:
    """One of each object of a tenant: what another tenant's ids are tried against."""

    dataset: str
    job: str
    checkpoint: str
    embedding_job: str
    weights: str


def add_objects(deployment: Deployment, tenant: str, checkpoint_on_disk: bool = False) -> Owned:
    """A ready labelled dataset, a running job on it with a checkpoint, a succeeded
    embedding job; the checkpoint's file exists only with `checkpoint_on_disk`."""
    ids = Owned(new_id("ds"), new_id("job"), new_id("ckpt"), new_id("emb"), new_id("wts"))
    relative = f"jobs/{ids.job}/run/checkpoints/step-000000002.pt"
    if checkpoint_on_disk:
        path = deployment.artifacts / relative
        path.parent.mkdir(parents=True)
        path.write_bytes(b"only its presence matters here")
    with db(deployment) as session:
        session.add(Dataset(id=ids.dataset, tenant=tenant, name="shapes", status="ready",
                            archive_bytes=1000, num_images=8, num_skipped=0, classes=["a", "b"]))
        session.flush()
        session.add(Job(id=ids.job, tenant=tenant, dataset_id=ids.dataset, status="running",
                        config={}, epochs=2))
        session.flush()
        session.add(Checkpoint(id=ids.checkpoint, job_id=ids.job, step=2, epoch=1, final=False,
                               path=relative, size_bytes=30, sha256="0" * 64))
        session.flush()
        session.add(EmbeddingJob(id=ids.embedding_job, tenant=tenant, job_id=ids.job,
                                 checkpoint_id=ids.checkpoint, dataset_id=ids.dataset,
                                 layer="backbone", status="succeeded", num_rows=8,
                                 path=f"embeddings/{ids.embedding_job}"))
        session.add(Weights(id=ids.weights, tenant=tenant, name="w", path=f"weights/{ids.weights}",
                            size_bytes=8, sha256="0" * 64, num_tensors=1))
    return ids


def id_routes(client: httpx.Client) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation whose path takes an id."""
    paths = client.get("/openapi.json").json()["paths"]
    return {(m.upper(), p) for p, item in paths.items() for m in item if "{" in p}


def all_routes(client: httpx.Client) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return sorted((m.upper(), p) for p, item in paths.items() for m in item)


# --------------------------------------------------------------------------- keys


def test_no_key_a_wrong_key_and_a_revoked_key_answer_the_same_401(
    deployment: Deployment,
) -> None:
    service = deployment.service
    tenant, owner = deployment.new_tenant()
    dataset = add_objects(deployment, tenant).dataset
    with owner, httpx.Client(base_url=service.base_url, timeout=30) as anonymous:
        key = owner.headers["Authorization"].removeprefix("Bearer ")
        assert owner.get(f"/v1/datasets/{dataset}").status_code == 200
        wrong = [
            key[:-1] + ("A" if key[-1] != "A" else "B"),  # right prefix, wrong secret
            "swav_" + "x" * 43,
            key[:13],
            f"{key} {key}",
        ]
        schemes = [f"Basic {key}", key, f"Token {key}", "Bearer"]

        routes = all_routes(anonymous)
        protected = [(m, p) for m, p in routes if p.startswith("/v1/")]
        assert {p for _, p in routes} - {p for _, p in protected} <= PUBLIC, routes
        for method, template in protected:
            path = re.sub(r"\{[^}]+\}", "x_1", template)
            response = anonymous.request(method, path)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json() == UNAUTHORIZED
            assert response.headers["www-authenticate"] == "Bearer"
            assert anonymous.request(method, path, headers={"Authorization": "Bearer nope"}
                                     ).json() == UNAUTHORIZED

        for secret in wrong:
            response = anonymous.get(f"/v1/datasets/{dataset}",
                                     headers={"Authorization": f"Bearer {secret}"})
            assert (response.status_code, response.json()) == (401, UNAUTHORIZED), secret
        for header in schemes:
            response = anonymous.get(f"/v1/datasets/{dataset}", headers={"Authorization": header})
            assert (response.status_code, response.json()) == (401, UNAUTHORIZED), header
        lowercase = anonymous.get(f"/v1/datasets/{dataset}",
                                  headers={"Authorization": f"bearer {key}"})
        assert lowercase.status_code == 200  # the scheme is case-insensitive (RFC 7235)

        for public in sorted(PUBLIC | {"/openapi.json", "/docs"}):
            assert anonymous.get(public).status_code == 200, public

        revoked = service.cli("revoke-key", key[:13])
        assert revoked.returncode == 0, revoked.stderr
        response = owner.get(f"/v1/datasets/{dataset}")
        assert (response.status_code, response.json()) == (401, UNAUTHORIZED)
        assert response.headers["www-authenticate"] == "Bearer"


def test_create_key_prints_it_once_and_stores_only_its_hash(deployment: Deployment) -> None:
    service = deployment.service
    tenant = f"t-{secrets.token_hex(4)}"
    created = service.cli("create-key", "--tenant", tenant, "--name", "ci")
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    key = lines[-1]
    assert KEY_PATTERN.fullmatch(key), lines
    assert all(key not in line for line in lines[:-1])

    with db(deployment) as session:
        row = session.scalars(select(ApiKey).where(ApiKey.tenant == tenant)).one()
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.prefix == key[:13] and row.name == "ci" and row.revoked_at is None
    assert key not in {str(getattr(row, c.key)) for c in ApiKey.__table__.columns}

    listed = service.cli("list-keys", "--tenant", tenant)
    assert listed.returncode == 0 and key not in listed.stdout
    assert listed.stdout.split("\t")[:3] == [row.id, row.prefix, tenant]
    assert "\tactive\t" in listed.stdout

    with service.client(key=key) as client:
        assert client.get("/v1/jobs").status_code == 200
        assert service.cli("revoke-key", row.id).returncode == 0
        assert client.get("/v1/jobs").status_code == 401
    assert "\tactive\t" not in service.cli("list-keys", "--tenant", tenant).stdout
    again = service.cli("revoke-key", row.id)  # revoking twice is harmless
    assert again.returncode == 0, again.stderr

    unknown = service.cli("revoke-key", "key_nope")
    assert unknown.returncode == 1 and "no API key" in unknown.stderr
    invalid = service.cli("create-key", "--tenant", "two words")
    assert invalid.returncode == 2 and "not valid" in invalid.stderr


def test_auth_is_off_only_when_the_setting_says_so(
    deployment: Deployment, tmp_path: Path
) -> None:
    """SWAV_AUTH_ENABLED=false: no key needed, every request is tenant "local"; the
    module's API (the setting unset) needs keys, as the other tests show."""
    local = add_objects(deployment, "local")
    other = add_objects(deployment, f"t-{secrets.token_hex(4)}")
    env = deployment.service.env | {"SWAV_AUTH_ENABLED": "false"}
    open_api = Service(env, tmp_path)  # same database and files; its logs in tmp_path
    try:
        open_api.start_api()
        with httpx.Client(base_url=open_api.base_url, timeout=30) as client:
            assert client.get(f"/v1/datasets/{local.dataset}").status_code == 200
            assert_error(client.get(f"/v1/datasets/{other.dataset}"), 404, "not_found",
                         "dataset_id")
            garbage = client.get(f"/v1/jobs/{local.job}", headers={"Authorization": "Bearer x"})
            assert garbage.status_code == 200
    finally:
        open_api.stop()


# --------------------------------------------------------------------------- isolation


def test_another_tenants_ids_answer_404_on_every_route(deployment: Deployment) -> None:
    owner_tenant, owner = deployment.new_tenant()
    other_tenant, other = deployment.new_tenant()
    theirs = add_objects(deployment, owner_tenant)
    mine = add_objects(deployment, other_tenant, checkpoint_on_disk=True)
    a = theirs
    cases: dict[tuple[str, str], list[tuple[str, dict[str, Any], str]]] = {
        # (METHOD, template): [(path, request kwargs, param of the 404)]
        ("GET", "/v1/datasets/{dataset_id}"): [(f"/v1/datasets/{a.dataset}", {}, "dataset_id")],
        ("DELETE", "/v1/datasets/{dataset_id}"): [
            (f"/v1/datasets/{a.dataset}", {}, "dataset_id")
        ],
        ("GET", "/v1/jobs/{job_id}"): [(f"/v1/jobs/{a.job}", {}, "job_id")],
        ("POST", "/v1/jobs/{job_id}/cancel"): [(f"/v1/jobs/{a.job}/cancel", {}, "job_id")],
        ("POST", "/v1/jobs/{job_id}/resume"): [(f"/v1/jobs/{a.job}/resume", {}, "job_id")],
        ("GET", "/v1/jobs/{job_id}/events"): [
            (f"/v1/jobs/{a.job}/events", {}, "job_id"),
            (f"/v1/jobs/{a.job}/events", {"headers": {"Accept": "text/event-stream"}},
             "job_id"),
        ],
        ("GET", "/v1/jobs/{job_id}/checkpoints"): [
            (f"/v1/jobs/{a.job}/checkpoints", {}, "job_id")
        ],
        ("POST", "/v1/jobs/{job_id}/embeddings"): [
            (f"/v1/jobs/{a.job}/embeddings", {"json": {}}, "job_id"),
            (f"/v1/jobs/{mine.job}/embeddings", {"json": {"checkpoint_id": a.checkpoint}},
             "checkpoint_id"),
            (f"/v1/jobs/{mine.job}/embeddings", {"json": {"dataset_id": a.dataset}},
             "dataset_id"),
        ],
        ("GET", "/v1/checkpoints/{checkpoint_id}"): [
            (f"/v1/checkpoints/{a.checkpoint}", {}, "checkpoint_id")
        ],
        ("GET", "/v1/checkpoints/{checkpoint_id}/download"): [
            (f"/v1/checkpoints/{a.checkpoint}/download", {"params": {"format": f}},
             "checkpoint_id")
            for f in ("full", "safetensors", "backbone")
        ],
        ("POST", "/v1/checkpoints/{checkpoint_id}/evaluate"): [
            (f"/v1/checkpoints/{a.checkpoint}/evaluate", {}, "checkpoint_id")
        ],
        ("GET", "/v1/jobs/{job_id}/map"): [(f"/v1/jobs/{a.job}/map", {}, "job_id")],
        ("POST", "/v1/jobs/{job_id}/neighbours"): [
            (f"/v1/jobs/{a.job}/neighbours", {"files": {"file": ("x.png", b"x", "image/png")}},
             "job_id")
        ],
        ("GET", "/v1/jobs/{job_id}/images/{path}"): [
            (f"/v1/jobs/{a.job}/images/a/0.png", {}, "job_id")
        ],
        ("GET", "/v1/embedding-jobs/{embedding_job_id}"): [
            (f"/v1/embedding-jobs/{a.embedding_job}", {}, "embedding_job_id")
        ],
        ("GET", "/v1/embedding-jobs/{embedding_job_id}/download"): [
            (f"/v1/embedding-jobs/{a.embedding_job}/download", {"params": {"file": f}},
             "embedding_job_id")
            for f in ("embeddings", "index")
        ],
        ("GET", "/v1/weights/{weights_id}"): [(f"/v1/weights/{a.weights}", {}, "weights_id")],
        ("DELETE", "/v1/weights/{weights_id}"): [
            (f"/v1/weights/{a.weights}", {}, "weights_id")
        ],
    }
    body_ids = [  # ids in request bodies
        ("POST", "/v1/jobs", {"json": {"dataset_id": a.dataset, "preset": "cpu-tiny"}},
         "not_found", "dataset_id"),
        ("POST", "/v1/jobs", {"json": {"dataset_id": mine.dataset, "preset": "cpu-tiny",
                                       "start_from": {"checkpoint_id": a.checkpoint}}},
         "not_found", "start_from.checkpoint_id"),
        ("POST", "/v1/jobs", {"json": {"dataset_id": mine.dataset, "preset": "cpu-tiny",
                                       "start_from": {"weights_id": a.weights}}},
         "not_found", "start_from.weights_id"),
        ("POST", "/v1/embeddings", {"json": {"model": a.job, "input": ["aGk="]}},
         "model_not_found", "model"),
        ("POST", "/v1/embeddings", {"json": {"model": a.checkpoint, "input": ["aGk="]}},
         "model_not_found", "model"),
        ("POST", "/v1/embeddings",
         {"data": {"model": a.checkpoint}, "files": {"files": ("x.png", b"x", "image/png")}},
         "model_not_found", "model"),
    ]
    with owner, other:
        assert set(cases) == id_routes(other), "every route that takes an id has a case"
        for (method, _), calls in cases.items():
            for path, kwargs, param in calls:
                response = other.request(method, path, **kwargs)
                assert_error(response, 404, "not_found", param)
        for method, path, kwargs, code, param in body_ids:
            assert_error(other.request(method, path, **kwargs), 404, code, param)
        for path, key in (("/v1/datasets", a.dataset), ("/v1/jobs", a.job),
                          ("/v1/weights", a.weights)):
            assert key not in {row["id"] for row in other.get(path).json()["data"]}
        listed = other.get(f"/v1/jobs/{mine.job}/checkpoints").json()["data"]
        assert [row["id"] for row in listed] == [mine.checkpoint]

        # The owner gets past each id: no 404 naming the parameter the other tenant's did.
        for (method, _), calls in cases.items():
            for path, kwargs, param in calls:
                if method != "GET" or kwargs.get("params", {}).get("format", "full") != "full":
                    continue  # no state changes, no exports of the stand-in checkpoint
                if kwargs.get("headers"):
                    continue  # the live stream of a running job does not end
                response = owner.request(method, path, **kwargs)
                if response.status_code == 404:
                    assert response.json()["error"]["param"] != param, (path, response.text)
                else:
                    assert response.status_code < 500, (path, response.text)
        model = owner.post("/v1/embeddings", json={"model": a.job, "input": ["aGk="]})
        assert_error(model, 409, "model_not_ready", "model")


def test_thumbnail_rate_limit_is_429_with_retry_after(deployment: Deployment) -> None:
    """Each thumbnail decodes a whole image: past the tenant's burst the route answers 429
    before it looks anything up, and neither the neighbour tenant nor the embedding
    rate is charged for it."""
    tenants = [deployment.new_tenant() for _ in range(2)]
    urls = []
    for tenant, _ in tenants:
        owned = add_objects(deployment, tenant)
        image = deployment.artifacts / "datasets" / owned.dataset / "images" / "a" / "0.png"
        image.parent.mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(image)
        urls.append(f"/v1/jobs/{owned.job}/images/a/0.png")
    (_, client), (_, neighbour) = tenants
    with client, neighbour:
        statuses = [client.get(urls[0]).status_code for _ in range(3)]
        assert statuses == [200] * 3  # the burst of 3
        limited = client.get(urls[0])
        message = assert_error(limited, 429, "rate_limited", None)
        assert message == ("over the limit of 1 thumbnails per second per tenant (burst 3, "
                           "SWAV_TENANT_THUMBNAILS_PER_S); retry after 1 s")
        assert limited.headers["retry-after"] == "1"
        assert_error(client.get("/v1/jobs/job_unknown/images/a/0.png"), 429, "rate_limited",
                     None)  # refused before the lookup
        assert neighbour.get(urls[1]).status_code == 200
        embedding = {"model": "job_unknown", "input": ["aGk="]}
        assert client.post("/v1/embeddings", json=embedding).status_code == 404
        time.sleep(1.1)
        assert client.get(urls[0]).status_code == 200


def test_clients_cannot_set_tenant_status_or_attempt(deployment: Deployment) -> None:
    tenant, client = deployment.new_tenant()
    owned = add_objects(deployment, tenant)
    base = {"dataset_id": owned.dataset, "preset": "cpu-tiny"}
    with client:
        for field, value in (("tenant", "local"), ("status", "succeeded"), ("attempt", 9),
                             ("id", "job_mine"), ("compute_seconds", 0)):
            message = assert_error(client.post("/v1/jobs", json=base | {field: value}),
                                   422, "invalid_request", field)
            assert message == f"{field}: unknown field; remove it (see the schema at /docs)"
        for path, body in ((f"/v1/jobs/{owned.job}/embeddings", {"tenant": "local"}),
                           ("/v1/embeddings", {"model": owned.job, "input": ["aGk="],
                                               "tenant": "local"})):
            assert_error(client.post(path, json=body), 422, "invalid_request", "tenant")
        upload = client.post("/v1/datasets", data={"tenant": "local"},
                             files={"file": ("a.zip", zip_of(100), "application/zip")})
        assert_error(upload, 422, "invalid_request", "tenant")
        assert [job["id"] for job in client.get("/v1/jobs").json()["data"]] == [owned.job]


# --------------------------------------------------------------------------- limits


def zip_of(size: int) -> bytes:
    """A zip holding `size` random (incompressible) bytes, stored: about size + 150 bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a/0.png", secrets.token_bytes(size))
    return buffer.getvalue()


def test_active_jobs_limit_is_429_naming_the_limit(deployment: Deployment) -> None:
    tenant, client = deployment.new_tenant()
    _, neighbour = deployment.new_tenant()
    owned = add_objects(deployment, tenant)  # its running job is one of the 2 allowed
    body = {"dataset_id": owned.dataset, "preset": "cpu-tiny"}
    with client, neighbour:
        first = client.post("/v1/jobs", json=body)
        assert first.status_code == 201, first.text
        message = assert_error(client.post("/v1/jobs", json=body), 429, "too_many_active_jobs",
                               None)
        assert "the limit is 2 active jobs" in message and "SWAV_TENANT_MAX_ACTIVE_JOBS" in message
        assert neighbour.get("/v1/jobs").status_code == 200  # other tenants are not limited

        cancelled = client.post(f"/v1/jobs/{first.json()['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        second = client.post("/v1/jobs", json=body)
        assert second.status_code == 201, second.text
        resumed = client.post(f"/v1/jobs/{first.json()['id']}/resume")
        assert_error(resumed, 429, "too_many_active_jobs", None)
        client.post(f"/v1/jobs/{second.json()['id']}/cancel")
        resumed = client.post(f"/v1/jobs/{first.json()['id']}/resume")
        assert resumed.status_code == 202 and resumed.json()["status"] == "queued"


def test_stored_bytes_limit_is_403_naming_the_limit(deployment: Deployment) -> None:
    tenant, client = deployment.new_tenant()
    owned = add_objects(deployment, tenant, checkpoint_on_disk=True)  # 1000 + 30 bytes
    with db(deployment) as session:
        session.add(Dataset(id=new_id("ds"), tenant=tenant, name="big", status="ready",
                            archive_bytes=80_000))
    small_zip = zip_of(5000)
    left = 100_000 - 81_030 - len(small_zip)
    with client:
        small = client.post("/v1/datasets", files={"file": ("s.zip", small_zip,
                                                             "application/zip")})
        assert small.status_code == 202, small.text
        # 40 000: refused at its Content-Length; 20 000: under left + the multipart
        # allowance (16 KiB), so refused while streaming, once the file passes `left`
        for size in (40_000, 20_000):
            response = client.post("/v1/datasets", files={"file": ("b.zip", zip_of(size),
                                                                     "application/zip")})
            message = assert_error(response, 403, "storage_limit_exceeded", None)
            assert "100000 bytes, SWAV_TENANT_MAX_STORED_BYTES" in message
            assert f"this upload is larger than the {human_bytes(left)} left" in message
        assert len(client.get("/v1/datasets").json()["data"]) == 3  # none left by a refusal

        full = new_id("ds")
        with db(deployment) as session:
            session.add(Dataset(id=full, tenant=tenant, name="full", status="ready",
                                archive_bytes=20_000))
        body = {"dataset_id": owned.dataset, "preset": "cpu-tiny"}
        for response in (
            client.post("/v1/jobs", json=body),
            client.post(f"/v1/jobs/{owned.job}/embeddings", json={}),
            client.post("/v1/datasets", files={"file": ("t.zip", zip_of(10), "application/zip")}),
        ):
            message = assert_error(response, 403, "storage_limit_exceeded", None)
            assert "the limit is 97.7 KiB (100000 bytes" in message

        assert client.delete(f"/v1/datasets/{full}").status_code == 204  # frees space again
        assert client.post("/v1/jobs", json=body).status_code == 201


def test_embedding_rate_limit_is_429_with_retry_after(deployment: Deployment) -> None:
    _, client = deployment.new_tenant()
    _, neighbour = deployment.new_tenant()
    body = {"model": "job_unknown", "input": ["aGk="]}
    with client, neighbour:
        statuses = [client.post("/v1/embeddings", json=body).status_code for _ in range(5)]
        assert statuses == [404] * 5  # the burst of 5 passes the limiter
        limited = client.post("/v1/embeddings", json=body)
        message = assert_error(limited, 429, "rate_limited", None)
        assert "limit of 1 embedding requests per second" in message
        assert limited.headers["retry-after"] == "1"
        assert neighbour.post("/v1/embeddings", json=body).status_code == 404
        time.sleep(1.1)
        assert client.post("/v1/embeddings", json=body).status_code == 404
