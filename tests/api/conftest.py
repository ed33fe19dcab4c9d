"""The API process most tests of a module share: `deployment`, on a database of its own.

A module sets the API's extra environment by overriding `api_env`, and adds what it
needs to the deployment (rows, files, a worker) in a fixture of its own that requests
this one.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Engine

from swav_service.db import make_engine
from tests.api.helpers import ENGINES
from tests.conftest import (
    REDIS_URL,
    Service,
    create_database,
    drop_database,
    migrate,
    service_env,
)


@dataclass
class Deployment:
    """A running API on a migrated PostgreSQL database and a Redis db of its own, with an
    engine on that database for writing what a worker would."""

    service: Service
    engine: Engine

    @property
    def artifacts(self) -> Path:
        return (self.service.data_dir / "artifacts").resolve()

    def new_tenant(self) -> tuple[str, httpx.Client]:
        """A fresh tenant's name and a client sending its new key."""
        tenant = f"t-{secrets.token_hex(4)}"
        return tenant, self.service.client(key=self.service.create_key(tenant))


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    """Environment variables the module's API runs with, besides the database and broker."""
    return {}


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    api_env: dict[str, str],
) -> Iterator[Deployment]:
    data_dir = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "data"
    data_dir.mkdir()
    url = create_database()
    redis_db = 1 + int(secrets.token_hex(1), 16) % 14
    redis.Redis.from_url(f"{REDIS_URL}/{redis_db}").flushdb()
    env = service_env(data_dir, url, f"{REDIS_URL}/{redis_db}") | api_env
    service = Service(env, data_dir)
    engine = make_engine(url)
    try:
        migrate(env)
        service.start_api()
        yield Deployment(service, engine)
    finally:
        service.stop()
        engine.dispose()
        drop_database(url)


@pytest.fixture
def tenant(deployment: Deployment) -> Iterator[tuple[str, httpx.Client]]:
    """A new tenant of the module's deployment and a client sending its key."""
    name, client = deployment.new_tenant()
    with client:
        yield name, client


@pytest.fixture(scope="module")
def api(deployment: Deployment) -> Iterator[Service]:
    """The API the module's tests share (tests/api/conftest.py); `db(api)` writes to its
    database with the deployment's engine."""
    url = deployment.service.env["SWAV_DATABASE_URL"]
    ENGINES[url] = deployment.engine
    yield deployment.service
    ENGINES.pop(url, None)


@pytest.fixture
def client(api: Service) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


ENVELOPE_KEYS = {"code", "message", "param"}


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    """The response is `status` with exactly the error envelope; returns its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ENVELOPE_KEYS, body
    assert body["error"]["code"] == code, body
    assert body["error"]["param"] == param, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return str(body["error"]["message"])
