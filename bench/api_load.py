"""API load: job-status reads at 32 concurrent clients on PostgreSQL, and upload memory.

Starts `swav-service api` on a fresh PostgreSQL database (127.0.0.1:5432), inserts one
ready dataset and 100 jobs, then 32 threads read GET /v1/jobs/{id} for --seconds and
report reads/s, p50/p99 latency and errors (must be 0). The bound measured in the same
run is the same reads against GET /healthz (no database), i.e. the HTTP stack alone.
Then a --upload-mb archive is streamed to POST /v1/datasets while the API process's RSS
is sampled: the peak growth must stay far below the upload size (the body is streamed).

    .venv/bin/python bench/api_load.py [--seconds 15] [--upload-mb 1024]
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

from swav_core.presets import config_from
from swav_service.db import make_engine
from swav_service.models import Dataset, Job, new_id

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hammer(
    base: str, paths: list[str], seconds: float, clients: int, headers: dict[str, str]
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=base, timeout=10, headers=headers) as http:
            n = i
            while time.monotonic() < stop:
                start = time.perf_counter()
                try:
                    ok = http.get(paths[n % len(paths)]).status_code == 200
                except httpx.HTTPError:
                    ok = False
                mine.append(time.perf_counter() - start)
                bad += not ok
                n += clients
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies) / (time.monotonic() - begin), latencies, errors


def chunks(total_mb: int) -> Iterator[bytes]:
    boundary = b"swavbench"
    yield (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="big.tar"\r\nContent-Type: application/x-tar\r\n\r\n'
    )
    block = os.urandom(1 << 20)
    for _ in range(total_mb):
        yield block
    yield b"\r\n--" + boundary + b"--\r\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args()

    name = f"swav_bench_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    data_dir = Path(tempfile.mkdtemp())
    env = {
        **os.environ,
        "SWAV_DATABASE_URL": url,
        "SWAV_BROKER_URL": "redis://127.0.0.1:6379/15",
        "SWAV_DATA_DIR": str(data_dir),
        "SWAV_MAX_UPLOAD_BYTES": str(4 * 1024**3),
    }
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "swav-service"), "migrate"], env=env, check=True)
    created = subprocess.run(
        [str(bin_dir / "swav-service"), "create-key", "--tenant", "local"],
        env=env, check=True, capture_output=True, text=True,
    )
    auth = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
    engine = make_engine(url)
    from sqlalchemy.orm import Session

    config = config_from("cpu-tiny")
    job_ids = [new_id("job") for _ in range(100)]
    with Session(engine) as session:
        session.add(Dataset(id="ds_bench", tenant="local", name="bench", status="ready"))
        session.flush()
        session.add_all(
            Job(
                id=j,
                tenant="local",
                dataset_id="ds_bench",
                status="running",
                config=config.model_dump(mode="json"),
                epochs=config.epochs,
                step=10,
                epoch=1,
                metrics={"loss": 1.0},
            )
            for j in job_ids
        )
        session.commit()
    engine.dispose()

    port = 8790
    api = subprocess.Popen(
        [str(bin_dir / "swav-service"), "api", "--port", str(port)], env=env, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        hammer(base, ["/healthz"], 2, args.clients, auth)  # warm-up
        bound, bound_lat, bound_err = hammer(base, ["/healthz"], args.seconds, args.clients, auth)
        rate, lat, errors = hammer(  # each read also looks up its API key
            base, [f"/v1/jobs/{j}" for j in job_ids], args.seconds, args.clients, auth
        )
        q = statistics.quantiles(lat, n=100)
        print(
            f"job-status reads: {rate:.0f}/s at {args.clients} clients, p50 {q[49] * 1000:.1f} ms, "
            f"p99 {q[98] * 1000:.1f} ms, errors {errors} of {len(lat)}"
        )
        bq = statistics.quantiles(bound_lat, n=100)
        print(
            f"bound (/healthz, no database): {bound:.0f}/s, p50 {bq[49] * 1000:.1f} ms, "
            f"errors {bound_err}; ratio {rate / bound:.3f}"
        )

        before = rss_mb(api.pid)
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(api.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.monotonic()
        response = httpx.post(
            f"{base}/v1/datasets",
            content=chunks(args.upload_mb),
            headers={"Content-Type": "multipart/form-data; boundary=swavbench", **auth},
            timeout=600,
        )
        elapsed = time.monotonic() - start
        done.set()
        sampler.join()
        print(
            f"upload {args.upload_mb} MB: status {response.status_code} in {elapsed:.1f} s "
            f"({args.upload_mb / elapsed:.0f} MB/s); API RSS {before:.0f} MB before, "
            f"peak {peak:.0f} MB (+{peak - before:.0f} MB)"
        )
    finally:
        os.killpg(api.pid, signal.SIGTERM)
        api.wait()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        subprocess.run(["rm", "-rf", str(data_dir)])


if __name__ == "__main__":
    main()
