"""Requests are authenticated before their body is read, JSON bodies are capped while they
stream in, and non-finite numbers are refused (api/request_guard.py), over real HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from swav_service.models import Dataset, Job, new_id
from tests.api.conftest import Deployment, assert_error

CAP = 64 * 1024


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_MAX_JSON_BODY_BYTES": str(CAP)}


@pytest.fixture(scope="module")
def tenant_key(deployment: Deployment) -> tuple[str, str]:
    """A tenant of its own and its key."""
    name = "guarded"
    key = deployment.service.create_key(name)
    return name, key


@pytest.fixture
def client(deployment: Deployment, tenant_key: tuple[str, str]) -> Iterator[httpx.Client]:
    with deployment.service.client(key=tenant_key[1]) as client:
        yield client


def ready_dataset(deployment: Deployment, tenant: str) -> str:
    dataset_id = new_id("ds")
    with Session(deployment.engine) as session, session.begin():
        session.add(Dataset(id=dataset_id, tenant=tenant, name="d", status="ready",
                            num_images=128, num_skipped=0, classes=["a", "b"]))
    return dataset_id


def jobs_of(deployment: Deployment, dataset_id: str) -> int:
    with Session(deployment.engine) as session:
        return int(session.scalar(select(func.count()).where(Job.dataset_id == dataset_id)) or 0)


def headers_only(base_url: str, head: str) -> tuple[int, dict[str, Any]]:
    """Send a request's head only (its announced body never follows) and read the answer:
    an answer at all shows the server did not wait for the body."""
    url = urlsplit(base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < length(data):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.split(b"\r\n\r\n", 1)[1])


def length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


def test_an_anonymous_request_is_refused_before_its_body_is_read(
    deployment: Deployment,
) -> None:
    status, body = headers_only(deployment.service.base_url, (
        "POST /v1/jobs HTTP/1.1\nHost: api\nContent-Type: application/json\n"
        "Content-Length: 50000000\n"
    ))
    assert status == 401 and body["error"]["code"] == "unauthorized"


def test_a_body_announced_over_the_cap_is_refused_unread(
    deployment: Deployment, tenant_key: tuple[str, str]
) -> None:
    status, body = headers_only(deployment.service.base_url, (
        f"POST /v1/jobs HTTP/1.1\nHost: api\nAuthorization: Bearer {tenant_key[1]}\n"
        f"Content-Type: application/json\nContent-Length: {CAP + 1}\n"
    ))
    assert status == 413 and body["error"]["code"] == "payload_too_large"
    assert f"over {CAP} bytes" in body["error"]["message"]
    assert "SWAV_MAX_JSON_BODY_BYTES" in body["error"]["message"]


def test_a_streamed_body_is_refused_once_it_passes_the_cap(
    deployment: Deployment, tenant_key: tuple[str, str], client: httpx.Client
) -> None:
    dataset_id = ready_dataset(deployment, tenant_key[0])
    padding = "x" * (CAP // 8)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        yield json.dumps({"dataset_id": dataset_id, "name": "n"})[:-1].encode()
        yield b', "metadata": {'
        for i in range(16):
            yield f'"k{i}": "{padding}", '.encode()
        yield b'"end": 1}}'

    response = client.post("/v1/jobs", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert_error(response, 413, "payload_too_large")
    assert jobs_of(deployment, dataset_id) == 0


@pytest.mark.parametrize(("field", "text"), [
    ("max_runtime_s", "Infinity"), ("max_runtime_s", "-Infinity"),
    ("metadata", '{"score": NaN}'), ("config", '{"base_lr": Infinity}'),
])
def test_non_finite_numbers_are_a_422(
    deployment: Deployment, tenant_key: tuple[str, str], client: httpx.Client, field: str, text: str
) -> None:
    dataset_id = ready_dataset(deployment, tenant_key[0])
    body = f'{{"dataset_id": "{dataset_id}", "preset": "cpu-tiny", "{field}": {text}}}'
    response = client.post("/v1/jobs", content=body,
                           headers={"Content-Type": "application/json"})
    message = assert_error(response, 422, "invalid_request")
    assert "not a JSON number" in message
    assert jobs_of(deployment, dataset_id) == 0


def test_a_body_under_the_cap_reaches_its_route(
    deployment: Deployment, tenant_key: tuple[str, str], client: httpx.Client
) -> None:
    dataset_id = ready_dataset(deployment, tenant_key[0])
    body = {"dataset_id": dataset_id, "preset": "cpu-tiny", "dry_run": True,
            "metadata": {"note": "y" * (CAP // 2)}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 200, response.text


def test_routes_with_their_own_caps_take_larger_bodies(client: httpx.Client) -> None:
    """An embedding request's images are capped by SWAV_MAX_IMAGE_BYTES, not the JSON cap:
    a body of 4 x the JSON cap reaches the route, which answers about the model."""
    files = {"files": ("a.png", b"\x89PNG" + b"0" * (4 * CAP), "image/png")}
    response = client.post("/v1/embeddings", data={"model": "ckpt_none"}, files=files)
    assert response.status_code != 413, response.text
    assert response.json()["error"]["code"] in {"model_not_found", "invalid_image"}
