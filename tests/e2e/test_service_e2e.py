"""The service end to end: real HTTP, a live uvicorn, live Celery workers, a real database.

PostgreSQL + Redis, and the embedded mode (SQLite + Celery's filesystem transport) that
the README's main job uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Service


def zip_folder(folder: Path, top: str = "shapes") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, f"{top}/{path.relative_to(folder)}")
    return buffer.getvalue()


def wait_for(
    check: Callable[[], Any], timeout: float, what: str, service: Service, every: float = 0.3
) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n{service.logs()}")


def upload_ready_dataset(client: httpx.Client, service: Service, shapes_dir: Path) -> dict:
    response = client.post("/v1/datasets", files={"file": ("shapes.zip", zip_folder(shapes_dir),
                                                           "application/zip")},
                           data={"name": "shapes"})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "validating"
    dataset_id = response.json()["id"]

    def ready() -> dict | None:
        body = client.get(f"/v1/datasets/{dataset_id}").json()
        assert body["status"] != "failed", body
        return body if body["status"] == "ready" else None

    return wait_for(ready, 120, "dataset ready", service)


def job_status(client: httpx.Client, job_id: str) -> dict:
    return client.get(f"/v1/jobs/{job_id}").json()


def run_to_success(client: httpx.Client, service: Service, dataset_id: str) -> dict:
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "preset": "cpu-tiny",
                                             "config": {"epochs": 2}, "name": "e2e"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert response.json()["status"] == "queued"

    def finished() -> dict | None:
        body = job_status(client, job_id)
        assert body["status"] not in ("failed", "cancelled"), body
        return body if body["status"] == "succeeded" else None

    job = wait_for(finished, 300, "job succeeded", service)
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 8
    assert job["progress"]["epochs"] == 2 and job["attempt"] == 1
    assert job["metrics"]["loss"] > 0 and job["eta_s"] == 0
    assert job["compute_seconds"] > 0 and job["error"] is None
    return job


def check_events_and_checkpoints(client: httpx.Client, job_id: str) -> None:
    events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1))
    states = [e["data"]["status"] for e in events if e["type"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    kinds = {e["type"] for e in events}
    assert {"dataset", "started", "metrics", "checkpoint", "finished"} <= kinds
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == sorted(steps) and steps[-1] == 8

    # The same log as a live stream, ending because the job is terminal.
    with client.stream("GET", f"/v1/jobs/{job_id}/events",
                       headers={"Accept": "text/event-stream"}) as stream:
        ids = [int(line[4:]) for line in stream.iter_lines() if line.startswith("id: ")]
    assert ids == seqs

    checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    final = [c for c in checkpoints if c["final"]]
    assert len(final) == 1 and final[0]["step"] == 8
    download = client.get(f"/v1/checkpoints/{final[0]['id']}/download", params={"format": "full"})
    assert download.status_code == 200
    digest = hashlib.sha256(download.content).hexdigest()
    assert digest == final[0]["sha256"] == download.headers["X-Checksum-SHA256"]
    assert len(download.content) == final[0]["size_bytes"]


def test_end_to_end_on_postgres_and_redis(pg_service: Service, shapes_dir: Path) -> None:
    pg_service.start_api()
    pg_service.start_worker("short")
    pg_service.start_worker("train")
    with pg_service.client() as client:
        assert client.get("/readyz").status_code == 200
        dataset = upload_ready_dataset(client, pg_service, shapes_dir)
        assert dataset["num_images"] == 128 and dataset["num_skipped"] == 0
        assert dataset["classes"] == ["cross", "disk", "square", "stripes"]
        job = run_to_success(client, pg_service, dataset["id"])
        check_events_and_checkpoints(client, job["id"])


def test_end_to_end_embedded(embedded_service: Service, shapes_dir: Path) -> None:
    embedded_service.start_api()
    embedded_service.start_worker("short,train")
    with embedded_service.client() as client:
        assert client.get("/readyz").status_code == 200
        dataset = upload_ready_dataset(client, embedded_service, shapes_dir)
        job = run_to_success(client, embedded_service, dataset["id"])
        check_events_and_checkpoints(client, job["id"])
        check_archives_without_images(client, embedded_service)
    assert (embedded_service.data_dir / "swav.db").exists()


def check_archives_without_images(client: httpx.Client, service: Service) -> None:
    """An archive of non-images, and one with escaping members, end `failed` with reasons."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.jpg", "a text file named .jpg")
        archive.writestr("empty.png", b"")
        archive.writestr("../escape.png", b"x")
    response = client.post("/v1/datasets", files={"file": ("junk.zip", buffer.getvalue(),
                                                           "application/zip")})
    assert response.status_code == 202
    dataset_id = response.json()["id"]

    def settled() -> dict | None:
        body = client.get(f"/v1/datasets/{dataset_id}").json()
        return body if body["status"] != "validating" else None

    body = wait_for(settled, 60, "dataset validated", service)
    assert body["status"] == "failed"
    assert body["error"]["code"] == "invalid_data"
    assert "no readable image" in body["error"]["message"]
    assert not (service.data_dir.parent / "escape.png").exists()
    assert not any(service.data_dir.rglob("escape.png"))


def test_cancel_then_resume_continues(pg_service: Service, shapes_dir: Path) -> None:
    # Renewals 10 min apart: the cancel can only reach the run through the runner's status
    # read between renewals (SWAV_CANCEL_POLL_S), long before the 200 steps are done
    pg_service.env.update({"SWAV_LEASE_RENEW_S": "600", "SWAV_LEASE_TTL_S": "1200"})
    pg_service.start_api()
    pg_service.start_worker("short,train")
    with pg_service.client() as client:
        dataset = upload_ready_dataset(client, pg_service, shapes_dir)
        created = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "preset": "cpu-tiny",
            "config": {"epochs": 50, "checkpoint_every_steps": 20}})
        job_id = created.json()["id"]
        wait_for(lambda: job_status(client, job_id)["progress"]["step"] >= 3, 120,
                 "3 steps", pg_service)
        cancel = client.post(f"/v1/jobs/{job_id}/cancel")
        assert cancel.status_code == 202 and cancel.json()["status"] in ("cancelling", "cancelled")
        stopped = wait_for(lambda: (j := job_status(client, job_id))["status"] == "cancelled"
                           and j, 120, "cancelled", pg_service)
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        stopped_at = max(c["step"] for c in checkpoints)
        assert 3 <= stopped_at < 200 and stopped["progress"]["step"] == stopped_at

        resumed = client.post(f"/v1/jobs/{job_id}/resume")
        assert resumed.status_code == 202 and resumed.json()["status"] == "queued"
        done = wait_for(lambda: (j := job_status(client, job_id))["status"] == "succeeded"
                        and j, 300, "resumed job succeeded", pg_service)
        assert done["progress"]["step"] == 200
        assert done["attempt"] == 1  # a resumed job starts a fresh budget of attempts

        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200})
        data = events.json()["data"]
        while events.json()["next_cursor"]:
            events = client.get(f"/v1/jobs/{job_id}/events",
                                params={"limit": 200, "after": events.json()["next_cursor"]})
            data += events.json()["data"]
        resumed_events = [e for e in data if e["type"] == "resumed"]
        assert [e["data"]["step"] for e in resumed_events] == [stopped_at]
        states = [e["data"]["status"] for e in data if e["type"] == "state"]
        assert states == ["queued", "running", "cancelling", "cancelled", "queued", "running",
                          "succeeded"]
        after_resume = data.index(resumed_events[0])
        later_steps = [e["data"]["step"] for e in data[after_resume:] if e["type"] == "metrics"]
        assert later_steps and min(later_steps) > stopped_at  # no finished step repeated
        assert json.dumps(done["config"])  # resolved config is part of the job
