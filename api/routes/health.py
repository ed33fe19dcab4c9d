"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can do work)."""

from __future__ import annotations

import logging
import tempfile

from fastapi import APIRouter
from sqlalchemy import text

from api.deps import SettingsDep
from api.errors import ApiError
from api.schemas.common import Health, Readiness
from swav_service.db import get_engine
from swav_service.settings import Settings

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


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
    """Which dependency is down, for anyone; why (addresses, driver errors) in the log only."""
    failures: list[str] = []
    for name, check in (("database", check_database), ("broker", lambda: check_broker(settings))):
        try:
            check()
        except Exception:  # any failure of a probe means "not ready"
            log.warning("readyz: the %s is unreachable", name, exc_info=True)
            failures.append(name)
    if failures:
        down = " and the ".join(failures)
        raise ApiError(503, "not_ready", f"not ready: the {down} is unreachable; see the "
                       "API's log for the error")
    return Readiness(status="ready", database="ok", broker="ok")
