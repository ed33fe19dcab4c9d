"""Nothing lost: leases, the reconciler and hand-back, against real faults.

Real PostgreSQL and Redis, a live API and live Celery workers; the faults are real too:
`kill -9` of a worker's process group, SIGTERM, a duplicate message, Redis restarted
without persistence, PostgreSQL stopped, a checkpoint write that fails. Leases are short
(a few seconds) so that recovery happens within the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from swav_service.db import make_engine
from swav_service.dispatch import TRAIN_TASK
from swav_service.models import Job
from swav_service.settings import Settings
from tests.conftest import REDIS_URL, Service
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for
from worker.celery_app import create_celery

FAST_LEASES = {
    "SWAV_LEASE_TTL_S": "4",
    "SWAV_LEASE_RENEW_S": "1",
    "SWAV_RECONCILE_INTERVAL_S": "1",
    "SWAV_RESEND_AFTER_S": "2",
    "SWAV_WORKER_HEARTBEAT_S": "1",
    "SWAV_POLL_INTERVAL_S": "0.2",
}


@pytest.fixture
def service(pg_service: Service) -> Service:
    pg_service.env.update(FAST_LEASES)
    return pg_service


def submit(client: httpx.Client, dataset_id: str, **config: Any) -> dict[str, Any]:
    extra = {k: config.pop(k) for k in ("max_attempts",) if k in config}
    body = {"dataset_id": dataset_id, "preset": "cpu-tiny", "config": config, **extra}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def events_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        after = rows[-1]["seq"] if rows else 0
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 200})
        rows += page.json()["data"]
        if not page.json()["data"]:
            return rows


def job_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return body


def wait_status(
    client: httpx.Client, service: Service, job_id: str, statuses: set[str], timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = job_of(client, job_id)
        return job if job["status"] in statuses else None

    result: dict[str, Any] = wait_for(reached, timeout, f"job in {statuses}", service)
    return result


def first_checkpoint(client: httpx.Client, service: Service, job_id: str) -> int:
    def saved() -> int | None:
        steps = [e["data"]["step"] for e in events_of(client, job_id) if e["type"] == "checkpoint"]
        return max(steps) if steps else None

    step: int = wait_for(saved, 120, "a checkpoint", service)
    return step


def trainers_of(job_id: str) -> list[int]:
    """Pids of live training processes working on the job's run folder.

    A process the trainer forks (e.g. ctypes' `ldconfig -p` at import) shows the trainer's
    command line until it execs: it is the same training process, not a second one, and
    is not counted (a launcher's ranks have command lines of their own and are).
    """
    found: dict[int, tuple[bytes, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state, parent = (entry / "stat").read_text().split(") ")[1].split()[:2]
        except (OSError, ValueError):
            continue
        cmdline = raw.split(b"\0")
        mine = b"worker.train_child" in cmdline and any(job_id.encode() in a for a in cmdline)
        if mine and state != "Z":
            found[int(entry.name)] = (raw, int(parent))
    return [
        pid for pid, (raw, parent) in found.items()
        if parent not in found or found[parent][0] != raw
    ]


class LeaseWatch(threading.Thread):
    """Samples the job's lease and its live training processes while a test runs."""

    def __init__(self, service: Service, job_id: str) -> None:
        super().__init__(daemon=True)
        self.engine = make_engine(service.env["SWAV_DATABASE_URL"])
        self.job_id = job_id
        self.owners: list[str] = []
        self.max_trainers = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            self.max_trainers = max(self.max_trainers, len(trainers_of(self.job_id)))
            try:
                with self.engine.connect() as connection:
                    owner = connection.execute(
                        select(Job.lease_owner).where(Job.id == self.job_id)
                    ).scalar()
            except Exception:
                continue
            if owner and (not self.owners or self.owners[-1] != owner):
                self.owners.append(owner)

    def __enter__(self) -> LeaseWatch:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        self.join()
        self.engine.dispose()


def kill_9(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def ready(service: Service, shapes_dir: Path) -> Iterator[tuple[httpx.Client, str]]:
    service.start_api()
    service.start_worker("short")
    with service.client() as client:
        yield client, upload_ready_dataset(client, service, shapes_dir)["id"]


def test_kill_9_mid_training_resumes_on_another_worker(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    first = service.start_worker("train", name="train-a@test")
    job = submit(client, dataset_id, epochs=30, checkpoint_every_steps=4)
    with LeaseWatch(service, job["id"]) as watch:
        wait_status(client, service, job["id"], {"running"}, 60)
        saved = first_checkpoint(client, service, job["id"])
        kill_9(first)
        wait_for(lambda: not trainers_of(job["id"]), 10, "the orphan trainer to die", service)
        service.start_worker("train", name="train-b@test")
        done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 240)

    assert done["status"] == "succeeded", done
    assert done["attempt"] == 2
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 120
    events = events_of(client, job["id"])
    resumed = [e["data"] for e in events if e["type"] == "resumed"]
    requeued = [e["data"] for e in events if e["type"] == "requeued"]
    assert requeued == [{"reason": "lease_expired", "attempt": 1}]
    assert len(resumed) == 1 and resumed[0]["step"] >= saved
    # At the kill the newest checkpoint is the one resumed from: no finished step is lost
    # beyond it, and the steps after it are trained once more, not counted twice.
    after = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert after[-1] == 120
    states = [e["data"]["status"] for e in events if e["type"] == "state"]
    assert states == ["queued", "running", "queued", "running", "succeeded"]
    assert watch.max_trainers == 1, "two training processes ran at once"
    assert len(watch.owners) == 2 and watch.owners[0] != watch.owners[1]


def test_a_duplicate_delivery_runs_once(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    service.start_worker("train", name="train-a@test")
    service.start_worker("train", name="train-b@test")
    job = submit(client, dataset_id, epochs=2)
    settings = Settings(broker_url=service.env["SWAV_BROKER_URL"],
                        data_dir=Path(service.env["SWAV_DATA_DIR"]),
                        train_queue=service.env["SWAV_TRAIN_QUEUE"])
    create_celery(settings).send_task(TRAIN_TASK, args=[job["id"]], queue=settings.train_queue)
    with LeaseWatch(service, job["id"]) as watch:
        done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 120)
        time.sleep(2)  # the second delivery, if later, finds a finished job
    assert done["status"] == "succeeded" and done["attempt"] == 1
    states = [e["data"]["status"] for e in events_of(client, job["id"]) if e["type"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert watch.max_trainers <= 1 and len(watch.owners) <= 1


def restart_redis() -> None:
    """Stop Redis without saving and start it again, empty (as CI starts it)."""
    subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], check=False,
                   capture_output=True, timeout=30)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port",
                    "6379", "--save", "", "--appendonly", "no"], check=True, timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if redis.Redis.from_url(REDIS_URL).ping():
                return
        except redis.RedisError:
            time.sleep(0.2)
    raise AssertionError("Redis did not come back")


def test_redis_restarted_without_persistence_while_queued(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    job = submit(client, dataset_id, epochs=1)
    restart_redis()
    queue = service.env["SWAV_TRAIN_QUEUE"]
    assert redis.Redis.from_url(service.env["SWAV_BROKER_URL"]).llen(queue) == 0
    service.start_worker("train", name="train-a@test")
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded", done


def postgres(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action,
                    *(["-m", "fast"] if action == "stop" else [])], check=True, timeout=60)


def readyz(service: Service) -> int:
    try:
        return httpx.get(f"{service.base_url}/readyz", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def test_postgres_down_for_10_s_during_training(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    service.env["SWAV_LEASE_TTL_S"] = "30"
    service.start_worker("train", name="train-a@test")
    job = submit(client, dataset_id, epochs=40, checkpoint_every_steps=8)
    wait_status(client, service, job["id"], {"running"}, 60)
    first_checkpoint(client, service, job["id"])
    postgres("stop")
    try:
        down_since = time.time()
        assert readyz(service) == 503
        time.sleep(max(0.0, 10 - (time.time() - down_since)))
    finally:
        postgres("start")
    wait_for(lambda: readyz(service) == 200, 60, "/readyz to recover", service)
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 240)
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 160
    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert any(c["final"] and c["available"] for c in checkpoints)


def test_a_job_that_always_crashes_stops_at_max_attempts(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    job = submit(client, dataset_id, epochs=30, max_attempts=2)
    for attempt in (1, 2):
        worker = service.start_worker("train", name=f"train-{attempt}@test")

        def running_attempt(expected: int = attempt) -> bool:
            body = job_of(client, job["id"])
            return bool(body["status"] == "running" and body["attempt"] == expected)

        wait_for(running_attempt, 90, f"attempt {attempt} running", service)
        kill_9(worker)
    done = wait_status(client, service, job["id"], {"failed", "queued", "succeeded"}, 60)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "worker_lost" and done["attempt"] == 2
    assert "2 attempts" in done["error"]["message"]


def test_non_finite_loss_fails_at_once_without_retry(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    service.start_worker("train", name="train-a@test")
    job = submit(client, dataset_id, epochs=2, base_lr=1e30, final_lr=1e30, warmup_epochs=0,
                 freeze_prototypes=0)
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "failed" and done["error"]["code"] == "non_finite_loss"
    assert done["attempt"] == 1


def test_sigterm_hands_the_job_back_with_a_fresh_checkpoint(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    first = service.start_worker("train", name="train-a@test")
    job = submit(client, dataset_id, epochs=30, checkpoint_every_epochs=0)
    wait_status(client, service, job["id"], {"running"}, 60)

    def stepping() -> bool:
        return int(job_of(client, job["id"])["progress"]["step"]) >= 3

    wait_for(stepping, 60, "a few steps", service)
    os.killpg(first.pid, signal.SIGTERM)
    first.wait(timeout=60)
    back = job_of(client, job["id"])
    assert back["status"] == "queued" and back["attempt"] == 0
    events = events_of(client, job["id"])
    checkpoints = [e["data"] for e in events if e["type"] == "checkpoint"]
    assert len(checkpoints) == 1 and checkpoints[0]["step"] >= 3  # saved at the stop
    assert [e["data"] for e in events if e["type"] == "requeued"] == [
        {"reason": "worker_shutdown"}
    ]
    service.start_worker("train", name="train-b@test")
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 240)
    assert done["status"] == "succeeded" and done["attempt"] == 1
    resumed = [e["data"] for e in events_of(client, job["id"]) if e["type"] == "resumed"]
    assert resumed[0]["step"] == checkpoints[0]["step"]


def test_a_failing_checkpoint_write_keeps_the_previous_one_and_says_why(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    job = submit(client, dataset_id, epochs=4, checkpoint_every_steps=4)
    run = Path(service.env["SWAV_DATA_DIR"]) / "artifacts" / "jobs" / job["id"] / "run"
    # The second checkpoint's sidecar name is taken by a folder: its write fails (EISDIR).
    (run / "checkpoints" / "step-000000008.pt.sha256" / "blocker").mkdir(parents=True)
    service.start_worker("train", name="train-a@test")
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "checkpoint_failed"
    assert "step-000000008.pt" in done["error"]["message"]
    assert "Is a directory" in done["error"]["message"]
    assert str(run) not in done["error"]["message"]
    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in checkpoints] == [4]
    response = client.get(f"/v1/checkpoints/{checkpoints[0]['id']}/download")
    assert response.status_code == 200 and len(response.content) == checkpoints[0]["size_bytes"]


def test_max_runtime_stops_the_job_with_timeout_and_keeps_its_checkpoint(
    service: Service, ready: tuple[httpx.Client, str]
) -> None:
    client, dataset_id = ready
    service.start_worker("train", name="train-a@test")
    response = client.post("/v1/jobs", json={
        "dataset_id": dataset_id, "preset": "cpu-tiny", "max_runtime_s": 3,
        "config": {"epochs": 500, "checkpoint_every_epochs": 0},
    })
    assert response.status_code == 201, response.text
    job = response.json()
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"
    assert "max_runtime_s" in done["error"]["message"]
    assert 3 <= done["compute_seconds"] < 60
    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert len(checkpoints) == 1 and checkpoints[0]["step"] == done["progress"]["step"]
