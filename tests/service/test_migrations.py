"""Alembic migrations: upgrade, downgrade and upgrade again on a fresh database, and the
migrated schema equals what swav_service.models declares (so no model change ships without one).

PostgreSQL is the production database; SQLite is the embedded default, so both run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from swav_service.db import make_engine
from swav_service.models import Base
from tests.conftest import BIN, ROOT, create_database, drop_database, service_env

TABLES = {
    "datasets", "jobs", "job_events", "checkpoints", "idempotency_keys", "embedding_jobs",
    "workers", "api_keys", "job_ranks", "storage_reservations", "weights",
}


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'swav.db'}"
        return
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


def alembic_config(url: str) -> Config:
    """The configuration `swav-service migrate` builds (api/cli.py), for `url`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = url
    return config


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database_url: str, tmp_path: Path) -> None:
    # First through the CLI, as deployments run it (settings from SWAV_* variables).
    env = service_env(tmp_path / "data", database_url, None)
    subprocess.run(
        [str(BIN / "swav-service"), "migrate"], env=env, cwd=ROOT, check=True, timeout=120
    )
    assert tables(database_url) == TABLES | {"alembic_version"}
    assert schema_differences(database_url) == []

    config = alembic_config(database_url)
    command.downgrade(config, "base")
    assert tables(database_url) == {"alembic_version"}
    assert len(schema_differences(database_url)) >= len(TABLES)  # the check can fail

    command.upgrade(config, "head")
    assert tables(database_url) == TABLES | {"alembic_version"}
    assert schema_differences(database_url) == []
