"""Artifacts in an S3-compatible store, against a real local S3 server (moto's server mode).

`moto_server` (installed with the dev extra) answers the S3 API over HTTP on a local port;
the service reaches it through boto3 exactly as it would reach AWS S3 or MinIO. The
service test runs a job, hands it back (SIGTERM), wipes the job's and the dataset's local
files as if the next worker were another machine, and checks that the job resumes from
the stored checkpoint and that downloads stream from the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from safetensors.torch import save as safetensors_bytes

from swav_core.checkpoint_names import sidecar_path
from swav_core.model import TinyCNN
from swav_service.settings import Settings
from swav_service.storage import S3Store, StorageError, artifact_store
from tests.conftest import BIN, Service, free_port
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for
from tests.worker.test_recovery import events_of, job_of, wait_status

BUCKET = "swav-test"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[str]:
    """A moto S3 server on a free local port, with an empty bucket; its URL."""
    port = free_port()
    log = (tmp_path / "moto.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.time() > deadline:
                    raise AssertionError("moto_server did not start") from None
                time.sleep(0.2)
        client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)


def keys(endpoint: str, prefix: str) -> dict[str, int]:
    pages = client(endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix
    )
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def storage_settings(endpoint: str, data_dir: Path) -> dict[str, str]:
    return {
        "SWAV_DATA_DIR": str(data_dir),
        "SWAV_STORAGE_URL": f"s3://{BUCKET}/artifacts",
        "SWAV_S3_ENDPOINT_URL": endpoint,
        "SWAV_S3_REGION": "us-east-1",
        "SWAV_S3_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "SWAV_S3_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
    }


def serve_with_store(service: Service, endpoint: str) -> Path:
    """The API and a short-queue worker on the S3 store; this machine's artifacts folder."""
    service.env.update(storage_settings(endpoint, service.data_dir))
    service.env["SWAV_POLL_INTERVAL_S"] = "0.2"
    service.start_api()
    service.start_worker("short")
    return service.data_dir / "artifacts"


def test_store_mirrors_the_artifacts_folder(s3_endpoint: str, tmp_path: Path) -> None:
    env = storage_settings(s3_endpoint, tmp_path / "a")
    settings = Settings(**{k.removeprefix("SWAV_").lower(): v for k, v in env.items()})
    store = artifact_store(settings)
    assert isinstance(store, S3Store) and store.remote
    run = settings.job_dir("job_x") / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run / "step-000000004.pt").write_bytes(b"weights" * 1000)
    sidecar_path(run / "step-000000004.pt").write_text('{"sha256": "a", "step": 4}')
    assert store.upload_tree(run) == 2
    assert set(keys(s3_endpoint, "artifacts/jobs/job_x/")) == {
        "artifacts/jobs/job_x/run/checkpoints/step-000000004.pt",
        "artifacts/jobs/job_x/run/checkpoints/step-000000004.pt.sha256",
    }

    # Another machine: nothing local; restore brings both, a second restore nothing.
    shutil.rmtree(settings.artifacts)
    assert store.restore(run) == 2
    assert (run / "step-000000004.pt").read_bytes() == b"weights" * 1000
    assert store.restore(run) == 0
    # A file of the same size left by an older run is replaced when its sidecar differs.
    (run / "step-000000004.pt").write_bytes(b"WEIGHTS" * 1000)
    sidecar_path(run / "step-000000004.pt").write_text('{"sha256": "b", "step": 4}')
    assert store.restore(run) == 2
    assert (run / "step-000000004.pt").read_bytes() == b"weights" * 1000


    opened = store.stream(run / "step-000000004.pt")
    assert opened is not None and opened[0] == 7000
    assert b"".join(opened[1]) == b"weights" * 1000
    assert store.stream(run / "missing.pt") is None
    assert store.fetch(run / "missing.pt") is False
    store.delete(run / "step-000000004.pt")
    (run / "step-000000004.pt").unlink()
    assert store.fetch(run / "step-000000004.pt") is False
    with pytest.raises(ValueError):
        store.key(tmp_path / "elsewhere")
    broken = S3Store(settings.artifacts, "no-such-bucket", "", client(s3_endpoint))
    with pytest.raises(StorageError):
        broken.upload(sidecar_path(run / "step-000000004.pt"))


def save(folder: Path, name: str, step: int, data: bytes) -> Path:
    """A checkpoint file and its sidecar, as the trainer commits them (sidecar first)."""
    path = folder / name
    sidecar_path(path).write_text(json.dumps({"file": name, "sha256": sha256(data),
                                              "size": len(data), "step": step}))
    path.write_bytes(data)
    return path


def test_an_exact_restore_never_removes_the_only_copy_of_the_jobs_progress(
    s3_endpoint: str, tmp_path: Path
) -> None:
    """`restore(exact=True)` before a run: a checkpoint the store lacks is uploaded when it
    is newer than the stored ones (its worker died before uploading it) or recorded (its
    upload failed); one a later run elsewhere went past is removed; so are half-commits."""
    env = storage_settings(s3_endpoint, tmp_path / "a")
    settings = Settings(**{k.removeprefix("SWAV_").lower(): v for k, v in env.items()})
    store = artifact_store(settings)
    run = settings.job_dir("job_x") / "run" / "checkpoints"
    run.mkdir(parents=True)
    prefix = "artifacts/jobs/job_x/run/checkpoints/"
    save(run, "step-000000004.pt", 4, b"four")
    save(run, "step-000000006.pt", 6, b"six")
    assert store.upload_tree(run) == 4

    pruned_elsewhere = save(run, "step-000000002.pt", 2, b"two")  # older, unrecorded
    upload_failed = save(run, "step-000000003.pt", 3, b"three")  # older, recorded
    not_uploaded = save(run, "step-000000008.pt", 8, b"eight")  # newer than the store
    half_saved = run / "step-000000010.pt.sha256"  # a save that died before its rename
    half_saved.write_text('{"step": 10}')
    (run / "step-000000012.pt").write_bytes(b"no sidecar: never committed")

    assert store.restore(run, exact=True, recorded=[upload_failed]) == 0
    names = ["step-000000003.pt", "step-000000004.pt", "step-000000006.pt",
             "step-000000008.pt"]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        names + [n + ".sha256" for n in names]
    )
    assert not pruned_elsewhere.exists()
    stored = keys(s3_endpoint, prefix)
    assert set(stored) == {prefix + n for n in names} | {prefix + n + ".sha256" for n in names}
    assert stored[prefix + not_uploaded.name] == len(b"eight")

    # Another machine now resumes from step 8, the job's latest progress.
    shutil.rmtree(settings.artifacts)
    assert store.restore(run, exact=True) == 8
    assert (run / "step-000000008.pt").read_bytes() == b"eight"

    # A final checkpoint at the newest step counts as newer than that step's checkpoint.
    final = save(run, "final.pt", 8, b"final")
    store.restore(run, exact=True)
    assert final.exists() and prefix + "final.pt" in keys(s3_endpoint, prefix)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_job_resumes_from_the_store_on_a_machine_without_its_files(
    pg_service: Service, s3_endpoint: str, shapes_dir: Path
) -> None:
    service = pg_service
    artifacts = serve_with_store(service, s3_endpoint)
    with service.client() as client_:
        dataset = upload_ready_dataset(client_, service, shapes_dir)
        stored_images = keys(s3_endpoint, f"artifacts/datasets/{dataset['id']}/images/")
        assert len(stored_images) == dataset["num_images"] == 128

        first = service.start_worker("train", name="machine-a@test")
        job = client_.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "preset": "cpu-tiny",
            "config": {"epochs": 6, "checkpoint_every_epochs": 0},
        }).json()
        wait_for(lambda: job_of(client_, job["id"])["progress"]["step"] >= 3, 120,
                 "a few steps", service)
        os.killpg(first.pid, signal.SIGTERM)  # hand back: checkpoint, then queued
        first.wait(timeout=60)
        assert job_of(client_, job["id"])["status"] == "queued"
        saved = [e["data"] for e in events_of(client_, job["id"]) if e["type"] == "checkpoint"]
        assert len(saved) == 1
        prefix = f"artifacts/jobs/{job['id']}/run/checkpoints/"
        name = Path(saved[0]["path"]).name
        stored = keys(s3_endpoint, prefix)
        assert set(stored) == {prefix + name, prefix + name + ".sha256"}
        assert stored[prefix + name] == saved[0]["size_bytes"]

        # The next worker's machine has neither the run folder nor the images.
        shutil.rmtree(artifacts / "jobs" / job["id"])
        shutil.rmtree(artifacts / "datasets" / dataset["id"] / "images")
        service.start_worker("train", name="machine-b@test")
        done = wait_status(client_, service, job["id"], {"succeeded", "failed"}, 240)
        assert done["status"] == "succeeded", done
        assert done["progress"]["step"] == 24
        resumed = [e["data"] for e in events_of(client_, job["id"]) if e["type"] == "resumed"]
        assert [r["step"] for r in resumed] == [saved[0]["step"]]

        # Every checkpoint still listed is in the store, and nothing pruned is left there.
        listed = client_.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
        stored = keys(s3_endpoint, prefix)
        assert {k for k in stored if k.endswith(".pt")} == {
            prefix + ("final.pt" if c["final"] else f"step-{c['step']:09d}.pt") for c in listed
        }
        final = next(c for c in listed if c["final"])

        # Downloads stream from the store: the API's machine need not have the file.
        (artifacts / "jobs" / job["id"] / "run" / "checkpoints" / "final.pt").unlink()
        response = client_.get(f"/v1/checkpoints/{final['id']}/download")
        assert response.status_code == 200
        assert response.headers["x-checksum-sha256"] == final["sha256"]
        assert sha256(response.content) == final["sha256"]
        assert len(response.content) == final["size_bytes"]
        # An export needs the file here: it is fetched from the store, then exported.
        backbone = client_.get(f"/v1/checkpoints/{final['id']}/download",
                               params={"format": "backbone"})
        assert backbone.status_code == 200
        assert sha256(backbone.content) == backbone.headers["x-checksum-sha256"]

        # A checkpoint gone from the store too answers 410, as a pruned one does.
        client(s3_endpoint).delete_object(Bucket=BUCKET, Key=prefix + "final.pt")
        gone = client_.get(f"/v1/checkpoints/{final['id']}/download")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "checkpoint_gone"


def test_a_deleted_datasets_images_leave_the_store_in_the_background(
    pg_service: Service, s3_endpoint: str, shapes_dir: Path
) -> None:
    """The delete answers 204 without touching the store; a worker whose store is
    unreachable leaves the images for a later pass; a worker that reaches it removes
    them, and only them."""
    service = pg_service
    service.env.update(storage_settings(s3_endpoint, service.data_dir))
    service.env["SWAV_RECONCILE_INTERVAL_S"] = "0.5"
    service.start_api()
    ingester = service.start_worker("short")
    with service.client() as client_:
        deleted, kept = (upload_ready_dataset(client_, service, shapes_dir) for _ in range(2))
        prefixes = [f"artifacts/datasets/{d['id']}/" for d in (deleted, kept)]
        assert [len(keys(s3_endpoint, p + "images/")) for p in prefixes] == [128, 128]
        assert all(keys(s3_endpoint, p + "prepared/") for p in prefixes)  # the training copy
        os.killpg(ingester.pid, signal.SIGTERM)
        ingester.wait(timeout=60)

        assert client_.delete(f"/v1/datasets/{deleted['id']}").status_code == 204
        assert client_.get(f"/v1/datasets/{deleted['id']}").status_code == 404

        reachable = dict(service.env)
        service.env["SWAV_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        blind = service.start_worker("short", name="blind@test")
        wait_for(lambda: "stay in the store until the next pass" in service.logs(), 120,
                 "a failed purge pass", service)
        assert blind.poll() is None  # the pass failed; the worker goes on
        assert len(keys(s3_endpoint, prefixes[0] + "images/")) == 128
        os.killpg(blind.pid, signal.SIGTERM)
        blind.wait(timeout=60)

        service.env = reachable
        service.start_worker("short", name="sighted@test")
        wait_for(lambda: not keys(s3_endpoint, prefixes[0]), 60, "the purge", service)
        assert len(keys(s3_endpoint, prefixes[1] + "images/")) == 128
        assert keys(s3_endpoint, prefixes[1] + "prepared/")
        assert client_.get(f"/v1/datasets/{kept['id']}").json()["status"] == "ready"


def test_a_job_starts_from_weights_and_a_checkpoint_this_machine_lacks(
    pg_service: Service, s3_endpoint: str, shapes_dir: Path
) -> None:
    """Start files live in the store: a train worker whose disk has neither the uploaded
    weights nor the parent's checkpoint fetches them (without the fetch the file is
    missing and the job fails `invalid_weights`)."""
    service = pg_service
    artifacts = serve_with_store(service, s3_endpoint)
    with service.client() as client_:
        dataset = upload_ready_dataset(client_, service, shapes_dir)
        backbone = {k: v.contiguous() for k, v in TinyCNN().state_dict().items()}
        uploaded = client_.post("/v1/weights", content=safetensors_bytes(backbone),
                                headers={"Content-Type": "application/octet-stream"})
        assert uploaded.status_code == 201, uploaded.text
        weights_file = artifacts / "weights" / f"{uploaded.json()['id']}.safetensors"
        assert f"artifacts/weights/{weights_file.name}" in keys(s3_endpoint, "artifacts/weights/")

        trainer = service.start_worker("train", name="machine-a@test")
        body = {"dataset_id": dataset["id"], "preset": "cpu-tiny", "config": {"epochs": 1}}
        parent = client_.post("/v1/jobs", json=body).json()
        assert wait_status(client_, service, parent["id"], {"succeeded", "failed"}, 180)[
            "status"] == "succeeded"
        final = next(c for c in client_.get(f"/v1/jobs/{parent['id']}/checkpoints").json()[
            "data"] if c["final"])
        os.killpg(trainer.pid, signal.SIGTERM)
        assert trainer.wait(timeout=60) == 0

        # The next worker's machine has neither start file.
        shutil.rmtree(artifacts / "jobs" / parent["id"])
        weights_file.unlink()
        service.start_worker("train", name="machine-b@test")
        loaded: dict[str, str] = {}
        for start_from in ({"weights_id": uploaded.json()["id"]}, {"checkpoint_id": final["id"]}):
            child = client_.post("/v1/jobs", json=body | {"start_from": start_from})
            assert child.status_code == 201, child.text
            done = wait_status(client_, service, child.json()["id"], {"succeeded", "failed"}, 180)
            assert done["status"] == "succeeded", done
            events = events_of(client_, child.json()["id"])
            [loaded[next(iter(start_from))]] = [
                e["data"]["loaded"] for e in events if e["type"] == "start_weights"
            ]
        assert loaded["weights_id"].startswith("the backbone (tiny_cnn)"), loaded
        assert loaded["checkpoint_id"].startswith("the whole model (tiny_cnn"), loaded
