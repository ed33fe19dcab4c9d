"""SWAV_TRAIN_FROM_PREPARED (default true) over the real service: a job trains from its
dataset's prepared copy (written at ingestion), and from the images when the copy is gone
or the setting is false; a worker on a machine without the dataset streams the copy from
the artifact store (moto's S3 server).

Real PostgreSQL, Redis, API and Celery workers; the "started" event names the data path.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from swav_core.prepared import MANIFEST_FILE, is_prepared
from swav_service.layout import dataset_images_dir, dataset_prepared_dir
from swav_service.settings import Settings
from tests.api.helpers import settings_of
from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset
from tests.service.test_storage_s3 import keys, s3_endpoint, storage_settings  # noqa: F401
from tests.worker.test_recovery import events_of, wait_status
from tests.worker.test_resources import submit


def test_a_job_trains_from_the_prepared_copy(pg_service: Service, shapes_dir: Path) -> None:
    service = pg_service
    service.env["SWAV_POLL_INTERVAL_S"] = "0.2"
    service.start_api()
    service.start_worker("short")
    trainer = service.start_worker("train")
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]
        prepared = dataset_prepared_dir(settings_of(service), dataset_id)
        assert is_prepared(prepared)

        def restart_trainer(train_from_prepared: str) -> None:
            nonlocal trainer
            os.killpg(trainer.pid, signal.SIGTERM)
            assert trainer.wait(timeout=60) == 0
            service.env["SWAV_TRAIN_FROM_PREPARED"] = train_from_prepared
            trainer = service.start_worker("train")

        def trained_from() -> list[str]:
            job = submit(client, dataset_id, epochs=1).json()
            done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 180)
            assert done["status"] == "succeeded", done
            assert done["progress"]["step"] == 4
            events = events_of(client, job["id"])
            assert not [e for e in events if e["type"] == "warning"]
            return [e["data"]["data_path"] for e in events if e["type"] == "started"]

        assert trained_from() == ["prepared"]
        restart_trainer("false")
        assert trained_from() == ["pil"]
        restart_trainer("true")
        (prepared / MANIFEST_FILE).unlink()  # an incomplete copy is never offered
        assert trained_from() == ["pil"]


def test_a_machine_without_the_dataset_streams_the_prepared_copy_from_the_store(
    pg_service: Service, s3_endpoint: str, shapes_dir: Path  # noqa: F811 (the fixture)
) -> None:
    """A train worker on another machine (its own data folder) trains from the store's
    prepared copy: its metadata and shards come there, its images never do."""
    service = pg_service
    service.env.update(storage_settings(s3_endpoint, service.data_dir))
    service.env["SWAV_POLL_INTERVAL_S"] = "0.2"
    service.env["SWAV_TRAIN_FROM_PREPARED"] = "true"
    service.start_api()
    service.start_worker("short")
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]
        prefix = f"artifacts/datasets/{dataset_id}/"
        stored = keys(s3_endpoint, prefix)
        assert prefix + "prepared/" + MANIFEST_FILE in stored
        assert len([k for k in stored if k.startswith(prefix + "images/")]) == 128
        machine_b = service.data_dir.parent / "machine-b"  # its own disk, the same store
        service.env["SWAV_DATA_DIR"] = str(machine_b)
        service.start_worker("train", name="machine-b@test")
        b_settings = Settings.model_validate({"data_dir": machine_b})
        job = submit(client, dataset_id, epochs=1).json()
        done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 180)
        assert done["status"] == "succeeded", done
        events = events_of(client, job["id"])
        assert [e["data"]["data_path"] for e in events if e["type"] == "started"] == ["prepared"]
        assert not [e for e in events if e["type"] == "warning"]
        assert not dataset_images_dir(b_settings, dataset_id).exists()
        assert is_prepared(dataset_prepared_dir(b_settings, dataset_id))  # every shard came
        assert (b_settings.artifacts / "jobs" / job["id"]).is_dir()  # it trained there
