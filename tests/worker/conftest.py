"""A migrated database in this process, for the worker's decision tables (lease, relay,
end state): real SQLAlchemy sessions on a real SQLite file, no broker, no child process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api.cli import migrate
from swav_service.db import get_engine, get_sessionmaker, session_scope
from swav_service.models import Dataset, Job, new_id
from swav_service.settings import Settings, get_settings


def _clear_caches() -> None:
    for cached in (get_settings, get_engine, get_sessionmaker):
        cached.cache_clear()


@pytest.fixture
def service_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The service's settings on a fresh, migrated SQLite database under tmp_path."""
    monkeypatch.setenv("SWAV_DATA_DIR", str(tmp_path / "var"))
    for name in ("SWAV_DATABASE_URL", "SWAV_ARTIFACTS_DIR", "SWAV_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    _clear_caches()
    migrate()
    yield get_settings()
    get_engine().dispose()
    _clear_caches()


@pytest.fixture
def make_job(service_db: Settings) -> Callable[..., str]:
    """Insert a ready dataset and a job with the given column values; the job's id."""

    def make(**values: object) -> str:
        job_id = new_id("job")
        with session_scope() as session:
            dataset = Dataset(id=new_id("ds"), tenant="t", name="d", status="ready")
            session.add(dataset)
            session.flush()
            row = {"status": "queued", "config": {}, "epochs": 1, **values}
            session.add(Job(id=job_id, tenant="t", dataset_id=dataset.id, **row))
        return job_id

    return make
