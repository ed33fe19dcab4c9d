"""`swav-service` key commands on a database nobody migrated yet: the real command in a
subprocess, as a user runs it before the first `migrate` or `up`."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import BIN, ROOT, create_database, drop_database, service_env


def swav_service(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "swav-service"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def unmigrated_postgres() -> Iterator[str]:
    """The URL of a fresh PostgreSQL database with no tables, dropped afterwards."""
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


def test_create_key_migrates_a_fresh_embedded_data_folder(tmp_path: Path) -> None:
    env = service_env(tmp_path / "data", None, None)  # SQLite under a folder not yet made
    created = swav_service(env, "create-key", "--tenant", "demo")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("swav_") and "Traceback" not in created.stderr
    assert (tmp_path / "data" / "swav.db").is_file()

    prefix = created.stdout.split("(prefix ", 1)[1].split(")", 1)[0]
    assert key.startswith(prefix)
    listed = swav_service(env, "list-keys")  # the key landed in the migrated database
    assert listed.returncode == 0, listed.stderr
    assert f"\t{prefix}\tdemo\t" in listed.stdout


def test_create_key_on_unmigrated_postgres_asks_for_migrate(
    tmp_path: Path, unmigrated_postgres: str
) -> None:
    env = service_env(tmp_path / "data", unmigrated_postgres, None)
    result = swav_service(env, "create-key", "--tenant", "demo")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        "swav-service create-key: the database is not migrated to this version's schema; "
        "run `swav-service migrate` first"
    )
    # Left as it was: migrating a server's database is the operator's step.
    with psycopg.connect(unmigrated_postgres) as conn:
        row = conn.execute("SELECT count(*) FROM information_schema.tables "
                           "WHERE table_schema = 'public'").fetchone()
    assert row == (0,)
