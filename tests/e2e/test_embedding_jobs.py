"""Batch embedding jobs and checkpoint quality reports over real HTTP: a live API, a live
short-queue worker, PostgreSQL and Redis. The dataset is uploaded and ingested as users
do; checkpoints are real cpu-tiny ones saved with `save_checkpoint`, their rows written
straight into the database (no training worker runs).
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from swav_core.checkpoint import save_checkpoint
from swav_core.image_folder import scan_image_folder
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_core.synthetic import write_shapes_dataset
from swav_service.db import make_engine
from swav_service.models import Checkpoint, Dataset, EmbeddingJob, Job, new_id
from tests.conftest import Service
from tests.e2e.test_service_e2e import wait_for

ENVELOPE_KEYS = {"code", "message", "param"}


def shapes_zip(folder: Path) -> bytes:
    """The shapes images plus one file that is not an image (ingestion skips it)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, f"shapes/{path.relative_to(folder)}")
        archive.writestr("shapes/disk/broken.png", b"not a png at all")
    return buffer.getvalue()


def upload_ready(client: httpx.Client, service: Service, tmp_path: Path) -> dict[str, Any]:
    folder = write_shapes_dataset(tmp_path / "shapes", per_class=8, size=32)
    response = client.post(
        "/v1/datasets",
        files={"file": ("shapes.zip", shapes_zip(folder), "application/zip")},
        data={"name": "shapes"},
    )
    assert response.status_code == 202, response.text
    dataset_id = response.json()["id"]

    def ready() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()
        assert body["status"] != "failed", body
        return body if body["status"] == "ready" else None

    dataset: dict[str, Any] = wait_for(ready, 120, "dataset ready", service)
    assert dataset["num_images"] == 32 and dataset["num_skipped"] == 1
    return dataset


def engine_of(service: Service) -> Engine:
    return make_engine(service.env["SWAV_DATABASE_URL"])


def add_job(engine: Engine, dataset_id: str, status: str = "succeeded") -> str:
    config = config_from("cpu-tiny")
    job_id = new_id("job")
    with Session(engine) as session:
        session.add(Job(id=job_id, tenant="local", dataset_id=dataset_id, status=status,
                        preset="cpu-tiny", config=config.model_dump(mode="json"),
                        epochs=config.epochs))
        session.commit()
    return job_id


def add_checkpoint(
    service: Service, engine: Engine, job_id: str, model: SwAVModel, step: int, final: bool
) -> str:
    """Save `model` as a real checkpoint of the job and register its row."""
    config = config_from("cpu-tiny")
    artifacts = (service.data_dir / "artifacts").resolve()
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
    info = save_checkpoint(artifacts / "jobs" / job_id / "run", state, step=step, keep_last=10,
                           final=final)
    assert info.sha256 is not None and info.size is not None
    checkpoint_id = new_id("ckpt")
    with Session(engine) as session:
        session.add(Checkpoint(id=checkpoint_id, job_id=job_id, step=step, epoch=1, final=final,
                               path=str(info.path.relative_to(artifacts)), size_bytes=info.size,
                               sha256=info.sha256))
        session.commit()
    return checkpoint_id


def random_model(seed: int) -> SwAVModel:
    """cpu-tiny with random weights and random batch-norm statistics."""
    torch.manual_seed(seed)
    model = SwAVModel.from_config(config_from("cpu-tiny"))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return model


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ENVELOPE_KEYS and error["code"] == code, error


def finished(client: httpx.Client, service: Service, embedding_job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/embedding-jobs/{embedding_job_id}").json()
        return body if body["status"] in ("succeeded", "failed") else None

    result: dict[str, Any] = wait_for(done, 120, "embedding job finished", service)
    return result


def test_batch_embedding_job_matches_online_embeddings(
    pg_service: Service, tmp_path: Path
) -> None:
    pg_service.start_api()
    pg_service.start_worker("short")
    engine = engine_of(pg_service)
    try:
        with pg_service.client() as client:
            dataset = upload_ready(client, pg_service, tmp_path)
            job_id = add_job(engine, dataset["id"])
            step_id = add_checkpoint(pg_service, engine, job_id, random_model(1), 4, False)
            final_id = add_checkpoint(pg_service, engine, job_id, random_model(2), 8, True)
            images_dir = (pg_service.data_dir / "artifacts" / "datasets" / dataset["id"]
                          / "images")
            files = list(scan_image_folder(images_dir).files)
            assert len(files) == 32 and files == sorted(files)

            for layer, normalize, checkpoint in (("backbone", True, None),
                                                 ("projection", False, step_id)):
                body: dict[str, Any] = {"layer": layer, "normalize": normalize}
                if checkpoint:
                    body["checkpoint_id"] = checkpoint
                response = client.post(f"/v1/jobs/{job_id}/embeddings", json=body)
                assert response.status_code == 202, response.text
                created = response.json()
                assert created["status"] == "queued" and created["id"].startswith("emb_")
                # default: the job's dataset and its final checkpoint
                assert created["dataset_id"] == dataset["id"]
                assert created["checkpoint_id"] == (checkpoint or final_id)
                result = finished(client, pg_service, created["id"])
                assert result["status"] == "succeeded", result
                assert result["num_rows"] == 32 and result["finished_at"] is not None

                url = f"/v1/embedding-jobs/{created['id']}/download"
                index = client.get(url, params={"file": "index"})
                assert index.status_code == 200
                assert json.loads(index.content) == files  # scan_image_folder order
                npy = client.get(url, params={"file": "embeddings"})
                assert npy.status_code == 200
                matrix = np.load(io.BytesIO(npy.content))
                assert matrix.dtype == np.float32 and matrix.shape[0] == 32
                if normalize:
                    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)

                # the same rows as POST /v1/embeddings on the same images, in index order
                online = client.post("/v1/embeddings", json={
                    "model": checkpoint or final_id, "layer": layer, "normalize": normalize,
                    "input": [base64.b64encode((images_dir / f).read_bytes()).decode()
                              for f in files],
                })
                assert online.status_code == 200, online.text
                expected = np.array([row["embedding"] for row in online.json()["data"]],
                                    dtype=np.float32)
                assert matrix.shape == expected.shape
                np.testing.assert_allclose(matrix, expected, atol=1e-5, rtol=0)

            # errors: unknown job, checkpoint, dataset and embedding job: 404
            assert_error(client.post("/v1/jobs/job_nope/embeddings", json={}), 404, "not_found")
            assert_error(client.post(f"/v1/jobs/{job_id}/embeddings",
                                     json={"checkpoint_id": "ckpt_nope"}), 404, "not_found")
            assert_error(client.post(f"/v1/jobs/{job_id}/embeddings",
                                     json={"dataset_id": "ds_nope"}), 404, "not_found")
            assert_error(client.get("/v1/embedding-jobs/emb_nope"), 404, "not_found")
            assert_error(client.get("/v1/embedding-jobs/emb_nope/download"), 404, "not_found")
            # a checkpoint of another job is not this job's
            other_job = add_job(engine, dataset["id"])
            assert_error(client.post(f"/v1/jobs/{other_job}/embeddings",
                                     json={"checkpoint_id": final_id}), 404, "not_found")
            # a job with no checkpoint yet: 409 model_not_ready
            assert_error(client.post(f"/v1/jobs/{other_job}/embeddings", json={}),
                         409, "model_not_ready")
            # a dataset still validating: 409 dataset_not_ready
            with Session(engine) as session:
                pending = new_id("ds")
                session.add(Dataset(id=pending, tenant="local", name="p", status="validating"))
                queued = EmbeddingJob(id=new_id("emb"), tenant="local", job_id=job_id,
                                      checkpoint_id=final_id, dataset_id=dataset["id"],
                                      layer="backbone", normalize=True, status="queued")
                session.add(queued)
                session.commit()
                queued_id = queued.id
            assert_error(client.post(f"/v1/jobs/{job_id}/embeddings",
                                     json={"dataset_id": pending}), 409, "dataset_not_ready")
            # not downloadable before it has succeeded
            assert_error(client.get(f"/v1/embedding-jobs/{queued_id}/download"),
                         409, "embeddings_not_ready")
            # bad layer: 422
            assert_error(client.post(f"/v1/jobs/{job_id}/embeddings", json={"layer": "x"}),
                         422, "invalid_request")
    finally:
        engine.dispose()


def listed_quality(client: httpx.Client, job_id: str, checkpoint_id: str) -> Any:
    rows = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    return next(r for r in rows if r["id"] == checkpoint_id)["quality"]


def test_quality_report_on_request(pg_service: Service, tmp_path: Path) -> None:
    pg_service.start_api()
    pg_service.start_worker("short")
    engine = engine_of(pg_service)
    try:
        with pg_service.client() as client:
            dataset = upload_ready(client, pg_service, tmp_path)
            assert dataset["classes"] == sorted(dataset["classes"]) and dataset["classes"]
            job_id = add_job(engine, dataset["id"])
            checkpoint_id = add_checkpoint(pg_service, engine, job_id, random_model(3), 2, False)
            assert listed_quality(client, job_id, checkpoint_id) is None

            response = client.post(f"/v1/checkpoints/{checkpoint_id}/evaluate")
            assert response.status_code == 202, response.text
            assert response.json()["id"] == checkpoint_id
            quality = wait_for(lambda: listed_quality(client, job_id, checkpoint_id), 120,
                               "quality report", pg_service)
            assert set(quality) == {"knn_top1", "linear_top1", "n_train", "n_val"}
            assert 0.0 <= quality["knn_top1"] <= 1.0 and 0.0 <= quality["linear_top1"] <= 1.0
            assert quality["n_train"] + quality["n_val"] == 32 and quality["n_val"] > 0
            single = client.get(f"/v1/checkpoints/{checkpoint_id}").json()
            assert single["quality"] == quality

            assert_error(client.post("/v1/checkpoints/ckpt_nope/evaluate"), 404, "not_found")

            # a real training run on the labelled dataset: the training worker's relay
            # requests a report for each checkpoint it records (computed on the short queue)
            pg_service.start_worker("train")
            response = client.post("/v1/jobs", json={"dataset_id": dataset["id"],
                                                     "preset": "cpu-tiny",
                                                     "config": {"epochs": 2}})
            assert response.status_code == 201, response.text
            trained_job = response.json()["id"]

            def succeeded() -> bool:
                status = client.get(f"/v1/jobs/{trained_job}").json()["status"]
                assert status not in ("failed", "cancelled")
                return bool(status == "succeeded")

            wait_for(succeeded, 300, "job succeeded", pg_service)

            def all_evaluated() -> list[dict[str, Any]] | None:
                rows: list[dict[str, Any]] = client.get(
                    f"/v1/jobs/{trained_job}/checkpoints").json()["data"]
                return rows if rows and all(r["quality"] for r in rows) else None

            rows = wait_for(all_evaluated, 120, "quality of every checkpoint", pg_service)
            assert any(r["final"] for r in rows)
            for row in rows:
                assert 0.0 <= row["quality"]["knn_top1"] <= 1.0
                assert row["quality"]["n_train"] + row["quality"]["n_val"] == 32
    finally:
        engine.dispose()
