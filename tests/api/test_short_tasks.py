"""The short queue is fair (api/limits.py): one quality report per checkpoint and one
embedding job per (checkpoint, dataset, layer) in flight, and a per-tenant cap on what a
tenant has in flight, over real HTTP with the real broker (Redis)."""

from __future__ import annotations

import httpx
import pytest
import redis
from sqlalchemy.orm import Session

from swav_service.models import Checkpoint, Dataset, Job, new_id
from tests.api.conftest import Deployment, assert_error

MAX_TASKS = 3


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_TENANT_MAX_SHORT_TASKS": str(MAX_TASKS)}


def short_queue_length(deployment: Deployment) -> int:
    return int(redis.Redis.from_url(deployment.service.env["SWAV_BROKER_URL"]).llen("short"))


def finished_job(deployment: Deployment, tenant: str, checkpoints: int) -> tuple[str, list[str]]:
    """A succeeded job on a labelled, ready dataset, with checkpoint files on disk."""
    dataset_id, job_id = new_id("ds"), new_id("job")
    ids = [new_id("ckpt") for _ in range(checkpoints)]
    folder = deployment.artifacts / "jobs" / job_id / "run" / "checkpoints"
    folder.mkdir(parents=True)
    with Session(deployment.engine) as session, session.begin():
        session.add(Dataset(id=dataset_id, tenant=tenant, name="d", status="ready",
                            num_images=8, num_skipped=0, classes=["a", "b"]))
        session.flush()
        session.add(Job(id=job_id, tenant=tenant, dataset_id=dataset_id, status="succeeded",
                        config={}, epochs=1))
        session.flush()
        for step, checkpoint_id in enumerate(ids, 1):
            (folder / f"step-{step}.pt").write_bytes(b"weights")
            session.add(Checkpoint(
                id=checkpoint_id, job_id=job_id, step=step, epoch=0, size_bytes=7,
                sha256="0" * 64, path=f"jobs/{job_id}/run/checkpoints/step-{step}.pt",
            ))
    return job_id, ids



def test_a_quality_report_asked_twice_is_queued_once(
    deployment: Deployment, tenant: tuple[str, httpx.Client]
) -> None:
    name, client = tenant
    _, (checkpoint_id,) = finished_job(deployment, name, 1)
    before = short_queue_length(deployment)
    for _ in range(3):
        response = client.post(f"/v1/checkpoints/{checkpoint_id}/evaluate")
        assert response.status_code == 202, response.text
    assert short_queue_length(deployment) == before + 1


def test_a_tenant_past_its_short_tasks_gets_429_and_others_do_not(
    deployment: Deployment, tenant: tuple[str, httpx.Client]
) -> None:
    name, client = tenant
    _, checkpoints = finished_job(deployment, name, MAX_TASKS + 1)
    for checkpoint_id in checkpoints[:MAX_TASKS]:
        assert client.post(f"/v1/checkpoints/{checkpoint_id}/evaluate").status_code == 202
    refused = client.post(f"/v1/checkpoints/{checkpoints[-1]}/evaluate")
    message = assert_error(refused, 429, "too_many_tasks")
    assert "SWAV_TENANT_MAX_SHORT_TASKS" in message and refused.headers["Retry-After"]
    other_name, other = deployment.new_tenant()
    with other:
        _, (theirs,) = finished_job(deployment, other_name, 1)
        assert other.post(f"/v1/checkpoints/{theirs}/evaluate").status_code == 202


def test_the_same_embedding_job_asked_twice_is_one_job(
    deployment: Deployment, tenant: tuple[str, httpx.Client]
) -> None:
    name, client = tenant
    job_id, (checkpoint_id,) = finished_job(deployment, name, 1)
    before = short_queue_length(deployment)
    body = {"checkpoint_id": checkpoint_id}
    first = client.post(f"/v1/jobs/{job_id}/embeddings", json=body)
    again = client.post(f"/v1/jobs/{job_id}/embeddings", json=body)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert first.json()["id"] == again.json()["id"]
    other_layer = client.post(f"/v1/jobs/{job_id}/embeddings", json={**body, "layer": "projection"})
    assert other_layer.status_code == 202 and other_layer.json()["id"] != first.json()["id"]
    assert short_queue_length(deployment) == before + 2
