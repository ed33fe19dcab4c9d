"""Soak: several tenants use one deployment at once for a few minutes, as real users would.

Each tenant, with the `swav_client` a user would use, in a loop: uploads a small labelled
dataset, submits a `cpu-tiny` job, follows its event stream to the end, downloads the
final checkpoint, embeds a few images with it, and meanwhile a second thread of the
tenant polls its jobs. Every HTTP answer is counted where the client sees it (a
transport under the client's retries), so a 5xx that a retry hid still counts.

Against `--mode postgres` (a fresh PostgreSQL database and Redis db 14, with an API, a
training and a short worker as separate processes) or `--mode embedded`
(`swav-service up`: SQLite and the filesystem broker). Prints the requests served, the
5xx count, the p50/p99 latency per route kind, the peak RSS of the API and of each
worker (sampled every 0.5 s, and compared between the soak's two halves), and whether
every job reached a terminal state within `--drain-s` after the soak. Exits 1 unless
there was no 5xx, every job ended and no process's memory grew.

    .venv/bin/python bench/soak.py [--mode postgres|embedded] [--minutes 3] [--tenants 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import redis

from swav_client import SwavClient
from swav_core.synthetic import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TERMINAL = {"succeeded", "failed", "cancelled"}
MEMORY_SLACK = 1.05
ID = re.compile(r"/(ds|job|ckpt|emb)_[0-9a-f]+")


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants (a worker's training child counts)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return rss_mb(pid) + sum(tree_rss_mb(int(kid)) for kid in kids)


class CountingTransport(httpx.HTTPTransport):
    """Records (route kind, status, seconds) of every request the client sends."""

    def __init__(self, record: list[tuple[str, int, float]], lock: threading.Lock) -> None:
        super().__init__()
        self.record, self.lock = record, lock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.monotonic()
        response = super().handle_request(request)
        path = ID.sub("/{id}", request.url.path)
        kind = f"{request.method} {path}"
        with self.lock:
            self.record.append((kind, response.status_code, time.monotonic() - started))
        return response


class Deployment:
    """The processes of one deployment, stopped (and its database dropped) by `close`."""

    def __init__(self, mode: str, port: int) -> None:
        self.mode, self.base = mode, f"http://127.0.0.1:{port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="swav-soak-"))
        self.env = {**os.environ, "SWAV_DATA_DIR": str(self.data_dir),
                    "SWAV_POLL_INTERVAL_S": "0.2"}
        self.database: str | None = None
        if mode == "postgres":
            self.database = f"swav_soak_{secrets.token_hex(4)}"
            with psycopg.connect(ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.database}"')
            redis.Redis.from_url("redis://127.0.0.1:6379/14").flushdb()
            self.env |= {"SWAV_DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/"
                         f"{self.database}", "SWAV_BROKER_URL": "redis://127.0.0.1:6379/14"}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.cli("migrate")
        if mode == "postgres":
            self.spawn("api", "api", "--port", str(port))
            self.spawn("train worker", "worker", "--queues", "train")
            self.spawn("short worker", "worker", "--queues", "short")
        else:
            self.spawn("up (API and workers)", "up", "--port", str(port))
        deadline = time.monotonic() + 120
        while not self.ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {self.data_dir}/*.log")
            time.sleep(0.5)

    def cli(self, *args: str) -> str:
        done = subprocess.run([str(BIN / "swav-service"), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        return done.stdout

    def spawn(self, name: str, *args: str) -> None:
        log = open(self.data_dir / f"{args[0]}-{len(self.processes)}.log", "wb")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(
            [str(BIN / "swav-service"), *args], env=self.env, cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def new_key(self, tenant: str) -> str:
        return self.cli("create-key", "--tenant", tenant).strip().splitlines()[-1]

    def close(self) -> None:
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if self.database:
            with psycopg.connect(ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        subprocess.run(["rm", "-rf", str(self.data_dir)], check=False)


def tenant_loop(
    deployment: Deployment, index: int, key: str, until: float,
    record: list[tuple[str, int, float]], lock: threading.Lock, jobs: list[str],
    failures: list[str],
) -> None:
    """One tenant's user: upload, train, follow, download, embed; until `until`."""
    tenant = f"soak-{index}"
    folder = deployment.data_dir / f"upload-{tenant}"
    write_shapes_dataset(folder, per_class=16, size=32, seed=index)
    images = sorted(folder.rglob("*.png"))[:8]
    stop_polling = threading.Event()

    def poll_jobs() -> None:
        with SwavClient(deployment.base, key, transport=CountingTransport(record, lock)) as c:
            while not stop_polling.is_set():
                with contextlib.suppress(Exception):
                    c.list_jobs()
                time.sleep(0.2)

    poller = threading.Thread(target=poll_jobs, daemon=True)
    poller.start()
    with SwavClient(deployment.base, key, transport=CountingTransport(record, lock)) as client:
        while time.monotonic() < until:
            try:
                dataset = client.upload_dataset(folder, name=f"{tenant}-shapes")
                dataset = client.wait_dataset(dataset.id, timeout_s=300)
                job = client.create_job(dataset.id, preset="cpu-tiny", config={"epochs": 1})
                with lock:
                    jobs.append(job.id)
                for event in client.stream_events(job.id):
                    if event.type == "state" and event.data.get("status") in TERMINAL:
                        break
                final = client.get_job(job.id)
                if final.status != "succeeded":
                    failures.append(f"{job.id}: {final.status} {final.error}")
                    continue
                checkpoint = client.list_checkpoints(job.id).data[0]
                with tempfile.TemporaryDirectory() as out:
                    client.download_checkpoint(checkpoint.id, out)
                client.embed(job.id, images)
            except Exception as exc:  # a failure the user would see; counted, then go on
                failures.append(f"{tenant}: {type(exc).__name__}: {exc}"[:300])
    stop_polling.set()
    poller.join()


def summary(record: list[tuple[str, int, float]]) -> Iterator[str]:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for kind, _, seconds in record:
        by_kind[kind].append(seconds)
    for kind, times in sorted(by_kind.items(), key=lambda item: -len(item[1])):
        q = statistics.quantiles(times, n=100) if len(times) > 1 else [times[0]] * 99
        yield (f"  {kind:<42} {len(times):>6}  p50 {q[49] * 1000:7.1f} ms  "
               f"p99 {q[98] * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("postgres", "embedded"), default="postgres")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--tenants", type=int, default=3)
    parser.add_argument("--drain-s", type=float, default=300.0)
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args()

    deployment = Deployment(args.mode, args.port)
    record: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    jobs: list[str] = []
    failures: list[str] = []
    peaks: dict[str, float] = defaultdict(float)
    # Peak RSS per process in each half of the soak: flat memory is a second half that
    # peaks no higher than the first (within MEMORY_SLACK), once every kind of request ran.
    halves: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    sampling = threading.Event()
    started = until = time.monotonic()

    def sample() -> None:
        while not sampling.is_set():
            now = time.monotonic()
            for name, process in deployment.processes.items():
                mb = tree_rss_mb(process.pid)
                peaks[name] = max(peaks[name], mb)
                if started < now < until:
                    half = int(now > (started + until) / 2)
                    halves[name][half] = max(halves[name][half], mb)
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        started = time.monotonic()
        until = started + 60 * args.minutes
        sampler.start()
        keys = [deployment.new_key(f"soak-{i}") for i in range(args.tenants)]
        tenants = [
            threading.Thread(target=tenant_loop, args=(deployment, i, key, until, record, lock,
                                                       jobs, failures))
            for i, key in enumerate(keys)
        ]
        for thread in tenants:
            thread.start()
        for thread in tenants:
            thread.join()
        ran = time.monotonic() - started
        deadline = time.monotonic() + args.drain_s
        statuses: dict[str, str] = {}
        while True:
            for key in keys:  # each tenant sees only its own jobs
                with SwavClient(deployment.base, key) as client:
                    statuses |= {j.id: j.status for j in client.list_jobs(limit=200).data}
            if all(statuses.get(j) in TERMINAL for j in jobs) or time.monotonic() > deadline:
                break
            time.sleep(2)
    finally:
        sampling.set()
        deployment.close()

    errors = sum(1 for _, status, _ in record if status >= 500)
    print(f"soak ({args.mode}): {args.tenants} tenants for {ran:.0f} s; {len(record)} requests "
          f"({len(record) / ran:.1f}/s), 5xx: {errors}")
    print("\n".join(summary(record)))
    print("peak RSS: " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in peaks.items()))
    for name, (first, second) in halves.items():
        verdict = "flat" if second <= first * MEMORY_SLACK else "GROWING"
        print(f"  {name}: peak {first:.0f} MB in the first half, {second:.0f} MB in the "
              f"second: {verdict}")
    flat = all(second <= first * MEMORY_SLACK for first, second in halves.values())
    terminal = sum(1 for j in jobs if statuses.get(j) in TERMINAL)
    print(f"jobs: {len(jobs)} submitted, {terminal} terminal, "
          f"{sum(1 for j in jobs if statuses.get(j) == 'succeeded')} succeeded")
    for failure in failures[:10]:
        print(f"  failure: {failure}")
    sys.exit(0 if errors == 0 and terminal == len(jobs) and flat else 1)


if __name__ == "__main__":
    main()
