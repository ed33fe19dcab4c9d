"""What the API tests write and read beside the API: rows in its database (as a worker
would write them), its broker's queues, archives and multipart bodies."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from swav_service.db import make_engine
from swav_service.models import Dataset, Job, new_id
from swav_service.settings import Settings
from tests.conftest import Service

ENGINES: dict[str, Engine] = {}


@contextmanager
def db(service: Service) -> Iterator[Session]:
    """A session on the service's database that commits at the end of the block."""
    url = service.env["SWAV_DATABASE_URL"]
    if url not in ENGINES:
        ENGINES[url] = make_engine(url)
    with Session(ENGINES[url], expire_on_commit=False) as session:
        yield session
        session.commit()


def dispose_engine(service: Service) -> None:
    engine = ENGINES.pop(service.env["SWAV_DATABASE_URL"], None)
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


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
