"""The training child cannot outlive its runner's lease, against real faults.

Real PostgreSQL, Redis, API and Celery workers with short leases (tests/worker/
test_recovery.py): a worker frozen with SIGSTOP past its lease loses its training child
before another worker is given the job, and a run folder still locked by an earlier
training process sends the job back to the queue without using an attempt.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for
from tests.worker.test_recovery import (
    FAST_LEASES,
    LeaseWatch,
    events_of,
    first_checkpoint,
    job_of,
    submit,
    trainers_of,
    wait_status,
)
from worker.fence import FolderLock


@pytest.fixture
def ready(pg_service: Service, shapes_dir: Path) -> Iterator[tuple[httpx.Client, str]]:
    pg_service.env.update(FAST_LEASES)
    pg_service.start_api()
    pg_service.start_worker("short")
    with pg_service.client() as client:
        yield client, upload_ready_dataset(client, pg_service, shapes_dir)["id"]


def run_folder(service: Service, job_id: str) -> Path:
    return Path(service.env["SWAV_DATA_DIR"]) / "artifacts" / "jobs" / job_id / "run"


def test_a_frozen_runner_loses_its_child_before_another_worker_trains_the_job(
    pg_service: Service, ready: tuple[httpx.Client, str]
) -> None:
    service = pg_service
    client, dataset_id = ready
    first = service.start_worker("train", name="train-a@test")
    job = submit(client, dataset_id, epochs=30, checkpoint_every_steps=4)
    run = run_folder(service, job["id"])
    wait_status(client, service, job["id"], {"running"}, 60)
    first_checkpoint(client, service, job["id"])
    [old_child] = trainers_of(job["id"])
    probe = FolderLock(run)
    assert not probe.try_acquire(), "the training child does not hold its run folder"
    probe.close()

    os.killpg(first.pid, signal.SIGSTOP)  # the worker, not its child (own session)
    try:
        service.start_worker("train", name="train-b@test")
        with LeaseWatch(service, job["id"]) as watch:

            def requeued() -> bool:
                return any(e["type"] == "requeued" for e in events_of(client, job["id"]))

            wait_for(requeued, 60, "the expired lease to be requeued", service)
            # The old child is gone as soon as the job can be given to anyone else.
            assert old_child not in trainers_of(job["id"])
            done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 240)
    finally:
        os.killpg(first.pid, signal.SIGCONT)

    assert done["status"] == "succeeded", done
    assert done["attempt"] == 2
    log = (run / "train.log").read_text(errors="replace")
    assert f"train_child {old_child}: fenced, its lease heartbeat" in log
    events = events_of(client, job["id"])
    assert [e["data"] for e in events if e["type"] == "requeued"] == [
        {"reason": "lease_expired", "attempt": 1}
    ]
    assert len([e for e in events if e["type"] == "resumed"]) == 1
    assert watch.max_trainers == 1, "two training processes ran at once"
    # The thawed worker found its lease gone: it wrote nothing and started nothing.
    assert job_of(client, job["id"])["status"] == "succeeded"
    assert not trainers_of(job["id"])


def test_a_run_folder_still_locked_sends_the_job_back_without_an_attempt(
    pg_service: Service, ready: tuple[httpx.Client, str]
) -> None:
    service = pg_service
    client, dataset_id = ready
    service.env["SWAV_RUN_LOCK_WAIT_S"] = "1"
    job = submit(client, dataset_id, epochs=1)
    held = FolderLock(run_folder(service, job["id"]))  # as an earlier child still running
    assert held.try_acquire()
    try:
        service.start_worker("train", name="train-a@test")

        def handed_back() -> bool:
            return any(e["type"] == "requeued" for e in events_of(client, job["id"]))

        wait_for(handed_back, 60, "the job handed back", service)
        assert not trainers_of(job["id"])  # no child was started on the locked folder
    finally:
        held.close()
    done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 120)
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 1  # the hand-backs used no attempt
    reasons = {e["data"]["reason"] for e in events_of(client, job["id"]) if e["type"] == "requeued"}
    assert reasons == {"run_folder_busy"}
