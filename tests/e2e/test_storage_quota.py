"""The stored-bytes limit counts what is on disk, over real HTTP with a live worker,
PostgreSQL and Redis: extracted images at ingestion, each checkpoint a running job writes,
embedding files and safetensors exports.

Each deployment's limit is set from sizes the test knows in advance: the archive it
uploads and the images in it (ingestion extracts every member as is).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Service
from tests.e2e.test_embedding_jobs import add_checkpoint, add_job, engine_of, finished, random_model
from tests.e2e.test_service_e2e import wait_for, zip_folder

SETTING = "SWAV_TENANT_MAX_STORED_BYTES"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def images_bytes(shapes_dir: Path) -> int:
    """What ingestion extracts from `zip_folder(shapes_dir)`: its png files."""
    return sum(p.stat().st_size for p in shapes_dir.rglob("*.png"))


def upload(client: httpx.Client, archive: bytes) -> str:
    response = client.post("/v1/datasets", files={"file": ("shapes.zip", archive)})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def settled(client: httpx.Client, service: Service, dataset_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()
        return body if body["status"] in ("ready", "failed") else None

    result: dict[str, Any] = wait_for(done, 120, "dataset validated", service)
    return result


def start(service: Service, limit: int | None, queues: str = "train,short") -> None:
    if limit is not None:
        service.env[SETTING] = str(limit)
    service.start_api()
    service.start_worker(queues)


def test_a_dataset_whose_extracted_images_cross_the_quota_fails(
    pg_service: Service, shapes_dir: Path
) -> None:
    archive = zip_folder(shapes_dir)
    limit = len(archive) + images_bytes(shapes_dir) - 1  # the archive fits, its images not
    start(pg_service, limit, "short")
    with pg_service.client() as client:
        dataset_id = upload(client, archive)
        dataset = settled(client, pg_service, dataset_id)
        assert dataset["status"] == "failed", dataset
        assert dataset["error"]["code"] == "storage_limit_exceeded"
        message = dataset["error"]["message"]
        assert f"({limit} bytes, {SETTING})" in message and "of extracted images" in message
        images = pg_service.data_dir / "artifacts" / "datasets" / dataset_id / "images"
        assert not images.exists()  # nothing over the limit is kept
        usage = client.get("/v1/usage").json()
        assert (usage["archives_bytes"], usage["images_bytes"]) == (len(archive), 0)


def test_a_training_job_that_crosses_the_quota_stops_and_keeps_its_last_checkpoint(
    pg_service: Service, shapes_dir: Path
) -> None:
    archive = zip_folder(shapes_dir)
    limit = len(archive) + images_bytes(shapes_dir) + 1  # ready, then one byte left
    start(pg_service, limit)
    with pg_service.client() as client:
        dataset = settled(client, pg_service, upload(client, archive))
        assert dataset["status"] == "ready", dataset
        usage = client.get("/v1/usage").json()
        assert usage["stored_bytes"] == limit - 1 and usage["images_bytes"] > 0
        # its prepared copy would cross the limit: left out, the dataset ready all the same
        prepared = pg_service.data_dir / "artifacts" / "datasets" / dataset["id"] / "prepared"
        assert not prepared.exists()

        # 30 epochs of 4 steps, a checkpoint every 4: the first one crosses the limit.
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "preset": "cpu-tiny",
            "config": {"epochs": 30, "checkpoint_every_steps": 4},
        })
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]

        def ended() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        job = wait_for(ended, 300, "job ended", pg_service)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "storage_limit_exceeded"
        message = job["error"]["message"]
        assert f"({limit} bytes, {SETTING})" in message and "last checkpoint kept" in message
        assert job["attempt"] == 1  # not retried: a new run would cross it again
        assert job["progress"]["step"] < job["progress"]["total_steps"]
        events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
        assert not [e for e in events if e["type"] == "requeued"]

        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
        assert checkpoints, "the last checkpoint is kept"
        last = max(checkpoints, key=lambda c: c["step"])
        download = client.get(f"/v1/checkpoints/{last['id']}/download")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == download.headers[
            "x-checksum-sha256"
        ]
        usage = client.get("/v1/usage").json()
        assert usage["stored_bytes"] > limit and usage["checkpoints_bytes"] > 0


def test_stored_bytes_count_embeddings_exports_and_images(
    pg_service: Service, shapes_dir: Path
) -> None:
    start(pg_service, None, "short")
    engine = engine_of(pg_service)
    artifacts = pg_service.data_dir / "artifacts"
    try:
        with pg_service.client() as client:
            archive = zip_folder(shapes_dir)
            dataset = settled(client, pg_service, upload(client, archive))
            assert dataset["status"] == "ready", dataset
            job_id = add_job(engine, dataset["id"])
            checkpoint_id = add_checkpoint(pg_service, engine, job_id, random_model(1), 8, True)
            run = artifacts / "jobs" / job_id / "run" / "checkpoints"
            before = client.get("/v1/usage").json()

            response = client.post(f"/v1/jobs/{job_id}/embeddings", json={})
            assert response.status_code == 202, response.text
            embedding = finished(client, pg_service, response.json()["id"])
            assert embedding["status"] == "succeeded", embedding
            written = folder_bytes(artifacts / "embeddings" / embedding["id"])
            after = client.get("/v1/usage").json()
            assert after["embeddings_bytes"] == written > 0
            assert after["stored_bytes"] == before["stored_bytes"] + written

            export = client.get(f"/v1/checkpoints/{checkpoint_id}/download",
                                params={"format": "safetensors"})
            assert export.status_code == 200
            exported = client.get("/v1/usage").json()
            assert exported["checkpoints_bytes"] == folder_bytes(run)  # .pt, sidecar, export
            assert exported["checkpoints_bytes"] > after["checkpoints_bytes"] + len(export.content)
            assert exported["archives_bytes"] == len(archive)
            images = artifacts / "datasets" / dataset["id"] / "images"
            prepared = artifacts / "datasets" / dataset["id"] / "prepared"
            assert folder_bytes(images) == images_bytes(shapes_dir)
            assert exported["images_bytes"] == folder_bytes(images) + folder_bytes(prepared)
            assert folder_bytes(prepared) > 0  # the images and their prepared copy
            assert exported["stored_bytes"] == sum(
                exported[k] for k in ("archives_bytes", "images_bytes", "checkpoints_bytes",
                                      "embeddings_bytes", "reserved_bytes")
            )
    finally:
        engine.dispose()
