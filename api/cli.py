"""`swav-service`: migrate, api, worker, up (migrate + API + workers for local use),
API keys: create-key, revoke-key, list-keys (on the database the settings name), and
prepare-datasets (the prepared copy of ready datasets ingested before it existed).

The key commands migrate the embedded SQLite file first when it is new or behind, so
`create-key` works on a fresh data folder; on a database server that is not migrated they
print one line asking for `swav-service migrate` and exit 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

ROOT = Path(__file__).resolve().parents[1]


def alembic_config() -> Config:
    """Alembic's configuration for the database named by the settings."""
    from alembic.config import Config

    from swav_service.settings import get_settings

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = get_settings().resolved_database_url
    return config


def migrate(revision: str = "head") -> None:
    """Upgrade the database named by the settings to `revision`."""
    from alembic import command

    from swav_service.settings import get_settings

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(), revision)


def schema_is_current() -> bool:
    """Whether the database is at this code's newest migration; False for a fresh one."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from swav_service.db import get_engine

    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    with get_engine().connect() as connection:
        return set(MigrationContext.configure(connection).get_current_heads()) == heads


def ensure_schema(command: str) -> bool:
    """Make sure the key commands find their tables; False after a one-line message.

    The embedded SQLite file is migrated on the spot, as `up` would, so that
    `create-key` works on a fresh data folder before the first `up`. A database server is
    left alone: migrating it is the operator's step (`swav-service migrate`), and doing it
    behind a key command could race a deployment's own migration.
    """
    from sqlalchemy.exc import OperationalError

    from swav_service.settings import get_settings

    try:
        if schema_is_current():
            return True
    except OperationalError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"swav-service {command}: cannot reach the database: {reason}", file=sys.stderr)
        return False
    settings = get_settings()
    if settings.embedded_database:
        migrate()
        print(f"swav-service {command}: migrated {settings.resolved_database_url}",
              file=sys.stderr)
        return True
    print(
        f"swav-service {command}: the database is not migrated to this version's schema; "
        "run `swav-service migrate` first",
        file=sys.stderr,
    )
    return False


def create_key(tenant: str, name: str | None) -> int:
    """Print a new key for `tenant`; the key alone on the last line, shown only this once."""
    from api.auth import ApiKeyError
    from api.auth import create_key as make_key
    from swav_service.db import get_sessionmaker

    if not ensure_schema("create-key"):
        return 1
    try:
        with get_sessionmaker()() as session:
            row, key = make_key(session, tenant, name)
    except ApiKeyError as exc:
        print(f"swav-service create-key: {exc}", file=sys.stderr)
        return 2
    print(f"created API key {row.id} (prefix {row.prefix}) for tenant {row.tenant}")
    print("store it now: only its hash is kept, it cannot be shown again")
    print(key)
    return 0


def revoke_key(id_or_prefix: str) -> int:
    """Revoke a key by id or prefix; requests with it answer 401 from now on."""
    from api.auth import ApiKeyError
    from api.auth import revoke_key as revoke
    from swav_service.db import get_sessionmaker

    if not ensure_schema("revoke-key"):
        return 1
    try:
        with get_sessionmaker()() as session:
            row = revoke(session, id_or_prefix)
    except ApiKeyError as exc:
        print(f"swav-service revoke-key: {exc}", file=sys.stderr)
        return 1
    print(f"revoked API key {row.id} (prefix {row.prefix}) of tenant {row.tenant}")
    return 0


def list_keys(tenant: str | None) -> int:
    """One line per key: id, prefix, tenant, created, revoked (or `active`), name."""
    from api.auth import list_keys as keys
    from swav_service.db import get_sessionmaker

    if not ensure_schema("list-keys"):
        return 1
    with get_sessionmaker()() as session:
        rows = keys(session, tenant)
    for row in rows:
        revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else "active"
        created = row.created_at.isoformat(timespec="seconds")
        print(f"{row.id}\t{row.prefix}\t{row.tenant}\t{created}\t{revoked}\t{row.name or ''}")
    return 0


def prepare_datasets() -> int:
    """Write the prepared copy (swav_service/prepared_copy.py) of every ready dataset that
    lacks one, one line per dataset; 1 if any could not be prepared (see the log)."""
    import logging

    from sqlalchemy import select

    from swav_service.db import session_scope
    from swav_service.models import Dataset
    from swav_service.prepared_copy import READY, prepare_ready_dataset
    from swav_service.settings import get_settings

    if not ensure_schema("prepare-datasets"):
        return 1
    logging.basicConfig(level=logging.INFO)
    with session_scope() as session:
        ids = session.scalars(
            select(Dataset.id).where(Dataset.status == READY).order_by(Dataset.created_at)
        ).all()
    failed = False
    for dataset_id in ids:
        outcome = prepare_ready_dataset(get_settings(), dataset_id)
        print(f"{dataset_id}: {outcome}", flush=True)
        failed |= outcome == "not prepared"
    return 1 if failed else 0


def run_api(host: str, port: int) -> None:
    import uvicorn

    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, log_level="warning")


def worker_command(
    queues: str, name: str | None, concurrency: int = 1, loglevel: str = "INFO"
) -> list[str]:
    """A Celery worker on `queues`: one task at a time (training takes a whole machine)."""
    hostname = name or f"{queues.replace(',', '-')}@%h-{os.getpid()}"
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app:app",
        "worker",
        "--queues",
        queues,
        "--pool",
        "solo",
        "--concurrency",
        str(concurrency),
        "--hostname",
        hostname,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def up(host: str, port: int) -> int:
    """Migrate, then run the API, a training worker and a short-task worker until Ctrl-C."""
    from swav_service.settings import get_settings

    migrate()
    settings = get_settings()
    commands = [
        [sys.executable, "-m", "api.cli", "api", "--host", host, "--port", str(port)],
        worker_command(settings.train_queue, None, loglevel="WARNING"),
        worker_command(settings.short_queue, None, loglevel="WARNING"),
    ]
    children = [subprocess.Popen(c, cwd=ROOT) for c in commands]
    print(
        f"swav-service up: http://{host}:{port} (data in {settings.data_dir.resolve()})", flush=True
    )
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.5)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swav-service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="upgrade the database to the latest schema")
    api = commands.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    worker = commands.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--queues", default="train,short")
    worker.add_argument("--name", default=None)
    local = commands.add_parser("up", help="migrate and run API + workers locally")
    local.add_argument("--host", default="127.0.0.1")
    local.add_argument("--port", type=int, default=8000)
    new_key = commands.add_parser(
        "create-key", help="create an API key for a tenant; printed once, on the last line"
    )
    new_key.add_argument("--tenant", required=True)
    new_key.add_argument("--name", default=None, help="a label shown by list-keys")
    revoke = commands.add_parser("revoke-key", help="revoke an API key by id or prefix")
    revoke.add_argument("key", metavar="KEY_ID_OR_PREFIX")
    listing = commands.add_parser("list-keys", help="list API keys (never the keys themselves)")
    listing.add_argument("--tenant", default=None)
    commands.add_parser(
        "prepare-datasets", help="write the prepared copy of ready datasets that lack it"
    )
    args = parser.parse_args(argv)

    if args.command == "migrate":
        migrate()
    elif args.command == "api":
        run_api(args.host, args.port)
    elif args.command == "worker":
        os.execv(sys.executable, worker_command(args.queues, args.name))
    elif args.command == "up":
        return up(args.host, args.port)
    elif args.command == "create-key":
        return create_key(args.tenant, args.name)
    elif args.command == "revoke-key":
        return revoke_key(args.key)
    elif args.command == "list-keys":
        return list_keys(args.tenant)
    elif args.command == "prepare-datasets":
        return prepare_datasets()
    return 0


if __name__ == "__main__":
    sys.exit(main())
