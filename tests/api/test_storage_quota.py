"""The stored-bytes limit holds under concurrency: an upload reserves its bytes when it is
admitted, so a second upload arriving while the first still streams cannot take the same
bytes (live API, PostgreSQL; no worker: the ingestion tasks wait in Redis unread)."""

from __future__ import annotations

import io
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from tests.api.conftest import Deployment, assert_error

MIB = 1 << 20
LIMIT = 5 * MIB // 2  # two 1.5 MiB uploads each fit alone, not together
BOUNDARY = "quota-boundary"


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_TENANT_MAX_STORED_BYTES": str(LIMIT)}


def stored_zip(size: int) -> bytes:
    """A zip of `size` random bytes, stored uncompressed (so the archive is that large)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a/noise.bin", os.urandom(size))
    return buffer.getvalue()


def multipart(archive: bytes) -> bytes:
    head = (
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.zip\"\r\n"
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    return head + archive + f"\r\n--{BOUNDARY}--\r\n".encode()


def read_status(sock: socket.socket) -> int:
    """The status code of the response on `sock` (sent with Connection: close)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1])


def upload_files(artifacts: Path) -> list[Path]:
    return [p for p in artifacts.glob("datasets/*/upload.zip") if p.stat().st_size > 0]


def test_an_upload_arriving_while_another_streams_cannot_take_the_same_bytes(
    deployment: Deployment,
) -> None:
    _, client = deployment.new_tenant()
    body = multipart(stored_zip(3 * MIB // 2))
    url = urlsplit(deployment.service.base_url)
    headers = (
        f"POST /v1/datasets HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: {client.headers['authorization']}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with client, socket.create_connection((url.hostname, url.port)) as first:
        # The first upload is admitted and streaming: its first MiB is on disk.
        first.sendall(headers + body[: 6 * MIB // 5])
        deadline = time.monotonic() + 60
        while not upload_files(deployment.artifacts):
            assert time.monotonic() < deadline, "the first upload never reached the disk"
            time.sleep(0.05)

        # The second arrives while the first holds its bytes: both fit alone, not together.
        second = client.post(
            "/v1/datasets",
            content=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        message = assert_error(second, 403, "storage_limit_exceeded", None)
        assert f"({LIMIT} bytes, SWAV_TENANT_MAX_STORED_BYTES)" in message
        assert "this upload is larger than the" in message

        first.sendall(body[6 * MIB // 5 :])
        assert read_status(first) == 202

        datasets = client.get("/v1/datasets").json()["data"]
        assert len(datasets) == 1
        usage = client.get("/v1/usage").json()
        assert usage["reserved_bytes"] == 0  # the dataset row took the reservation over
        archive = len(body) - len(multipart(b""))
        assert usage["archives_bytes"] == usage["stored_bytes"] == archive
        assert usage["limit_bytes"] == LIMIT


def test_usage_without_uploads_is_zero(deployment: Deployment) -> None:
    _, client = deployment.new_tenant()
    with client:
        usage = client.get("/v1/usage")
        assert usage.status_code == 200
        assert usage.json() == {
            "stored_bytes": 0, "limit_bytes": LIMIT, "archives_bytes": 0, "images_bytes": 0,
            "checkpoints_bytes": 0, "embeddings_bytes": 0, "reserved_bytes": 0,
            "weights_bytes": 0,
        }


def test_a_refused_upload_leaves_no_reservation(deployment: Deployment) -> None:
    """Refused while streaming (no Content-Length: reserved as it arrives), it frees what
    it held, so a smaller upload fits afterwards."""
    _, client = deployment.new_tenant()

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    too_big = multipart(stored_zip(3 * MIB))
    with client:
        response = client.post(
            "/v1/datasets",
            content=chunks(too_big),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        assert_error(response, 403, "storage_limit_exceeded", None)
        assert client.get("/v1/usage").json()["stored_bytes"] == 0
        fits = client.post("/v1/datasets", files={"file": ("s.zip", stored_zip(MIB))})
        assert fits.status_code == 202, fits.text


def test_weights_count_against_the_limit(deployment: Deployment) -> None:
    """Uploaded weights are stored bytes: a file past what is left is refused (403), and
    one that fits is counted, so the next one that would pass the limit is refused too."""
    _, client = deployment.new_tenant()
    headers = {"Content-Type": "application/octet-stream"}
    with client:
        fits = safetensors_bytes({"w": torch.zeros(int(1.5 * MIB) // 4)})
        answer = client.post("/v1/weights", content=fits, headers=headers)
        assert answer.status_code == 201, answer.text
        assert client.get("/v1/usage").json()["weights_bytes"] == len(fits)
        refused = client.post("/v1/weights", content=fits, headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "storage_limit_exceeded"
        assert len(client.get("/v1/weights").json()["data"]) == 1
        assert client.get("/v1/usage").json()["stored_bytes"] == len(fits)


def test_a_weights_upload_holds_its_bytes_while_it_streams(deployment: Deployment) -> None:
    """A weights file reserves its Content-Length at admission, so a second upload that
    would fit only without it is refused while the first still streams; the row then
    takes the reservation over."""
    _, client = deployment.new_tenant()
    body = safetensors_bytes({"w": torch.zeros(int(1.5 * MIB) // 4)})
    url = urlsplit(deployment.service.base_url)
    headers = (
        f"POST /v1/weights?name=first HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: {client.headers['authorization']}\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with client, socket.create_connection((url.hostname, url.port)) as first:
        first.sendall(headers + body[:MIB])
        deadline = time.monotonic() + 60
        while client.get("/v1/usage").json()["reserved_bytes"] != len(body):
            assert time.monotonic() < deadline, "the first upload never reserved its bytes"
            time.sleep(0.05)

        second = client.post(
            "/v1/weights", content=body, headers={"Content-Type": "application/octet-stream"}
        )
        assert_error(second, 403, "storage_limit_exceeded", None)
        first.sendall(body[MIB:])
        assert read_status(first) == 201

        usage = client.get("/v1/usage").json()
        assert usage["reserved_bytes"] == 0
        assert usage["weights_bytes"] == usage["stored_bytes"] == len(body)
        assert [w["name"] for w in client.get("/v1/weights").json()["data"]] == ["first"]


def test_a_refused_weights_upload_leaves_no_reservation(deployment: Deployment) -> None:
    """Streamed without a length past what the tenant has left: 403, nothing kept."""
    _, client = deployment.new_tenant()
    too_big = safetensors_bytes({"w": torch.zeros(3 * MIB // 4)})

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 256 * 1024):
            yield data[start : start + 256 * 1024]

    before = sorted(deployment.artifacts.glob("weights/*"))
    with client:
        response = client.post(
            "/v1/weights", content=chunks(too_big),
            headers={"Content-Type": "application/octet-stream"},
        )
        assert_error(response, 403, "storage_limit_exceeded", None)
        assert client.get("/v1/usage").json()["stored_bytes"] == 0
        assert sorted(deployment.artifacts.glob("weights/*")) == before  # no partial file
