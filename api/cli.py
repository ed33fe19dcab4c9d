"""`swav-service`: migrate, api, worker, up (migrate + API + workers for local use)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def migrate(revision: str = "head") -> None:
    """Upgrade the database named by the settings to `revision`."""
    from alembic import command
    from alembic.config import Config

    from api.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = settings.resolved_database_url
    command.upgrade(config, revision)


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
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def up(host: str, port: int) -> int:
    """Migrate, then run the API, a training worker and a short-task worker until Ctrl-C."""
    from api.settings import get_settings

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
    args = parser.parse_args(argv)

    if args.command == "migrate":
        migrate()
    elif args.command == "api":
        run_api(args.host, args.port)
    elif args.command == "worker":
        os.execv(sys.executable, worker_command(args.queues, args.name))
    elif args.command == "up":
        return up(args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
