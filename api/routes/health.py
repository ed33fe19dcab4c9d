"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can do work)."""

from __future__ import annotations

import tempfile

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SettingsDep
from api.errors import ApiError
from api.schemas import Health, Readiness
from swav_service.db import get_engine
from swav_service.settings import Settings

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 1.0


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def _short(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:200]}" if first_line else type(exc).__name__


def check_database() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))


def check_broker(settings: Settings) -> None:
    """Raise if the broker cannot take messages (Redis ping, or a writable broker folder)."""
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_S, socket_connect_timeout=PROBE_TIMEOUT_S
        )
        try:
            client.ping()
        finally:
            client.close()
    elif url.startswith("filesystem://"):
        folder = settings.broker_folder / "queue"
        if not folder.is_dir():
            raise FileNotFoundError(f"broker folder {folder} does not exist")
        # os.access ignores read-only mounts; writing a file is the real test.
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".readyz-"):
            pass
    else:
        from kombu import Connection

        with Connection(url, connect_timeout=PROBE_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"description": "The database or the broker is unreachable (`not_ready`)."}},
)
def readyz(settings: SettingsDep) -> Readiness:
    failures: list[str] = []
    for name, check in (("database", check_database), ("broker", lambda: check_broker(settings))):
        try:
            check()
        except Exception as exc:  # any failure of a probe means "not ready", with its reason
            failures.append(f"{name}: {_short(exc)}")
    if failures:
        raise ApiError(503, "not_ready", "not ready: " + "; ".join(failures))
    return Readiness(status="ready", database="ok", broker="ok")
