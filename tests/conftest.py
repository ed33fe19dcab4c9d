from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from swav_core.synthetic import write_shapes_dataset


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shape classes x 32 images of 32 px: 128 images, 4 steps per epoch at batch 32."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), per_class=32, size=32)


# --- service fixtures: real PostgreSQL, Redis, uvicorn and Celery processes ---------------


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_database() -> str:
    """A new empty PostgreSQL database; its URL."""
    name = f"swav_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def service_env(data_dir: Path, database_url: str | None, broker_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAV_")}
    env["SWAV_DATA_DIR"] = str(data_dir)
    if database_url:
        env["SWAV_DATABASE_URL"] = database_url
    if broker_url:
        env["SWAV_BROKER_URL"] = broker_url
    env["PYTHONPATH"] = str(ROOT)
    return env


def migrate(env: dict[str, str]) -> None:
    subprocess.run(
        [str(BIN / "swav-service"), "migrate"], env=env, check=True, cwd=ROOT, timeout=120
    )


class Service:
    """A deployment under test: its env, and processes started with `start_*`.

    `start_api` (always after migrate) makes an API key of tenant "local" with the real
    `swav-service create-key`; `client()` sends it.
    """

    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.base_url = ""
        self.key: str | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`swav-service ARGS` on this deployment's settings, output captured."""
        return subprocess.run(
            [str(BIN / "swav-service"), *args],
            env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )

    def create_key(self, tenant: str = "local", name: str | None = None) -> str:
        """A new API key of `tenant`: the last line `swav-service create-key` prints."""
        result = self.cli("create-key", "--tenant", tenant, *(["--name", name] if name else []))
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    def other_tenant_key(self) -> str:
        """A key of a new tenant, which owns nothing yet."""
        return self.create_key(f"tenant-{secrets.token_hex(4)}")

    def ensure_key(self) -> str:
        """The tenant "local" key, made on first use (the database must be migrated)."""
        if self.key is None:
            self.key = self.create_key()
        return self.key

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ensure_key()}"}

    def start_api(self) -> str:
        self.ensure_key()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.api = self._spawn("api", "--port", str(port))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200:
                    return self.base_url
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("API did not start")

    def start_worker(
        self, queues: str = "train,short", name: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A worker on `queues` ("train", "short": this deployment's queue names)."""
        names = {"train": self.env.get("SWAV_TRAIN_QUEUE", "train"),
                 "short": self.env.get("SWAV_SHORT_QUEUE", "short")}
        queues = ",".join(names.get(q, q) for q in queues.split(","))
        args = ["worker", "--queues", queues]
        if name:
            args += ["--name", name]
        return self._spawn(*args)

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.data_dir / f"{args[0]}-{len(self.processes)}.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [str(BIN / "swav-service"), *args],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def client(
        self, key: str | None = None, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Client:
        """An HTTP client of the API sending `key` (default: the tenant "local" key)."""
        sent = {"Authorization": f"Bearer {key}"} if key else self.auth_headers
        return httpx.Client(
            base_url=self.base_url, timeout=30, headers=sent | (headers or {}), **kwargs
        )

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.data_dir.glob("*.log"))
        )


@contextmanager
def migrated_service(env: dict[str, str], data_dir: Path) -> Iterator[Service]:
    """A Service on a migrated database; its processes are stopped at the end."""
    data_dir.mkdir()
    migrate(env)
    service = Service(env, data_dir)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def pg_service(tmp_path: Path) -> Iterator[Service]:
    """PostgreSQL (a fresh database, migrated) + Redis (a db number and queue names of
    its own, so that test sessions running side by side never take each other's tasks)."""
    url = create_database()
    redis_db = 1 + int(secrets.token_hex(1), 16) % 14
    import redis

    redis.Redis.from_url(f"{REDIS_URL}/{redis_db}").flushdb()
    env = service_env(tmp_path / "data", url, f"{REDIS_URL}/{redis_db}")
    suffix = secrets.token_hex(4)
    env |= {"SWAV_TRAIN_QUEUE": f"train-{suffix}", "SWAV_SHORT_QUEUE": f"short-{suffix}"}
    try:
        with migrated_service(env, tmp_path / "data") as service:
            yield service
    finally:
        drop_database(url)


@pytest.fixture
def embedded_service(tmp_path: Path) -> Iterator[Service]:
    """SQLite + Celery's filesystem transport under one data directory."""
    with migrated_service(service_env(tmp_path / "data", None, None), tmp_path / "data") as service:
        yield service
