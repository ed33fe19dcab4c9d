"""A 2-node job: two worker processes on this machine, one gloo rank each.

Real PostgreSQL, Redis, API and Celery workers. The job waits until two workers have
claimed its node ranks, trains as one gang (torch's launcher, static rendezvous at the
endpoint node 0's worker recorded), checkpoints, and succeeds; a `kill -9` of the worker
holding node 1 sends it back to the queue, and a new gang resumes it from its last
checkpoint. Leases are short (tests/worker/test_recovery.py) so recovery happens in the test.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import redis
from sqlalchemy import select

from swav_service.db import make_engine
from swav_service.dispatch import TRAIN_TASK
from swav_service.models import JobRank
from swav_service.settings import Settings
from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for
from tests.worker.test_recovery import (
    FAST_LEASES,
    events_of,
    first_checkpoint,
    job_of,
    kill_9,
    trainers_of,
    wait_status,
)
from worker.celery_app import create_celery


def rank_owners(service: Service, job_id: str) -> dict[int, int]:
    """Node rank -> pid of the worker process that holds it (owner is host:pid:thread)."""
    engine = make_engine(service.env["SWAV_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(JobRank.node_rank, JobRank.owner).where(JobRank.job_id == job_id)
            ).all()
    finally:
        engine.dispose()
    return {rank: int(owner.split(":")[1]) for rank, owner in rows}


def claims(client: httpx.Client, job_id: str) -> list[int]:
    return [e["data"]["node_rank"] for e in events_of(client, job_id)
            if e["type"] == "rank_claimed"]


def test_two_node_job_gathers_trains_and_resumes_after_a_node_is_killed(
    pg_service: Service, shapes_dir: Path
) -> None:
    service = pg_service
    service.env.update(FAST_LEASES)
    service.env["SWAV_WORKER_ADDRESS"] = "127.0.0.1"
    service.start_api()
    service.start_worker("short")
    workers: dict[int, subprocess.Popen[bytes]] = {}
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]
        first = service.start_worker("train", name="node-a@test")
        workers[first.pid] = first
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset_id, "preset": "cpu-tiny",
            "config": {"epochs": 4, "checkpoint_every_steps": 4},
            "resources": {"gpus": 1, "nodes": 2},
        })
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        # One worker claims a node and waits: the job does not start without the other.
        wait_for(lambda: claims(client, job_id) == [0], 60, "node 0 claimed", service)
        time.sleep(3)  # 15 polls of the claimant
        waiting = job_of(client, job_id)
        assert waiting["status"] == "queued" and waiting["attempt"] == 0
        assert claims(client, job_id) == [0]

        second = service.start_worker("train", name="node-b@test")
        workers[second.pid] = second
        wait_status(client, service, job_id, {"running"}, 90)
        assert claims(client, job_id) == [0, 1]
        owners = rank_owners(service, job_id)
        assert owners == {0: first.pid, 1: second.pid}
        saved = first_checkpoint(client, service, job_id)

        kill_9(workers[owners[1]])
        back = wait_status(client, service, job_id, {"queued", "failed"}, 60)
        assert back["status"] == "queued", back
        wait_for(lambda: not trainers_of(job_id), 30, "the old gang's trainers to end", service)
        service.start_worker("train", name="node-c@test")
        done = wait_status(client, service, job_id, {"succeeded", "failed"}, 300)

        assert done["status"] == "succeeded", done
        assert done["attempt"] == 2
        assert done["progress"]["step"] == done["progress"]["total_steps"] == 16
        events = events_of(client, job_id)
        states = [e["data"]["status"] for e in events if e["type"] == "state"]
        assert states == ["queued", "running", "queued", "running", "succeeded"]
        # Node 0 saw node 1 go: its training failed on the broken connection (gloo's
        # "Connection reset by peer"), or it noticed the rank's expired lease first.
        requeued = [e["data"] for e in events if e["type"] == "requeued"]
        assert requeued == [{"reason": "rank_lost", "attempt": 1}]
        started = [e["data"] for e in events if e["type"] == "started"]
        assert [s["world_size"] for s in started] == [2, 2]
        resumed = [e["data"] for e in events if e["type"] == "resumed"]
        assert len(resumed) == 1 and resumed[0]["step"] >= saved
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        assert any(c["final"] and c["available"] for c in checkpoints)
        assert rank_owners(service, job_id) == {}  # a finished job holds no node claims


def two_node_job(client: httpx.Client, dataset_id: str) -> str:
    response = client.post("/v1/jobs", json={
        "dataset_id": dataset_id, "preset": "cpu-tiny", "config": {"epochs": 1},
        "resources": {"gpus": 1, "nodes": 2},
    })
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def released(client: httpx.Client, job_id: str) -> list[str]:
    return [e["data"]["reason"] for e in events_of(client, job_id)
            if e["type"] == "rank_released"]


def test_a_gang_that_cannot_form_gives_its_worker_back(
    pg_service: Service, shapes_dir: Path
) -> None:
    service = pg_service
    service.env.update(FAST_LEASES | {"SWAV_WORKER_ADDRESS": "127.0.0.1", "SWAV_GANG_WAIT_S": "2"})
    service.start_api()
    service.start_worker("short")
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]
        service.start_worker("train", name="alone@test")
        gang = two_node_job(client, dataset_id)  # two nodes, one worker: it cannot form
        wait_for(lambda: claims(client, gang) == [0], 60, "node 0 claimed", service)
        single = client.post("/v1/jobs", json={
            "dataset_id": dataset_id, "preset": "cpu-tiny", "config": {"epochs": 1},
        }).json()["id"]
        done = wait_status(client, service, single, {"succeeded", "failed"}, 120)

        assert done["status"] == "succeeded", done  # the claimant's worker was freed
        assert "gang_wait" in released(client, gang)
        waiting = job_of(client, gang)
        assert waiting["status"] == "queued" and waiting["attempt"] == 0


def test_two_gangs_holding_half_the_workers_each_do_not_deadlock(
    pg_service: Service, shapes_dir: Path
) -> None:
    """Worker a holds node 0 of the older job, worker b node 0 of the younger: b gives
    way at once (not after SWAV_GANG_WAIT_S, which is 10 minutes here) and both run."""
    service = pg_service
    service.env.update(FAST_LEASES | {"SWAV_WORKER_ADDRESS": "127.0.0.1"})
    service.start_api()
    service.start_worker("short")
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]
        older, younger = two_node_job(client, dataset_id), two_node_job(client, dataset_id)
        # The queue in the order that splits the workers: older, younger, older, younger.
        queue = service.env["SWAV_TRAIN_QUEUE"]
        redis.Redis.from_url(service.env["SWAV_BROKER_URL"]).delete(queue)
        settings = Settings(broker_url=service.env["SWAV_BROKER_URL"],
                            data_dir=Path(service.env["SWAV_DATA_DIR"]), train_queue=queue)
        sender = create_celery(settings)
        for job_id in (older, younger, older, younger):
            sender.send_task(TRAIN_TASK, args=[job_id], queue=queue)
        service.start_worker("train", name="node-a@test")
        wait_for(lambda: claims(client, older) == [0], 60, "a holding the older job", service)
        service.start_worker("train", name="node-b@test")
        for job_id in (older, younger):
            done = wait_status(client, service, job_id, {"succeeded", "failed"}, 240)
            assert done["status"] == "succeeded" and done["attempt"] == 1, done

        assert claims(client, younger)[0] == 0 and "older_gang_forming" in released(
            client, younger
        )
        assert released(client, older) == []
