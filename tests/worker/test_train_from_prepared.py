"""SWAV_TRAIN_FROM_PREPARED over the real service: a job trains from its dataset's prepared
copy (written at ingestion), and from the images when the copy is gone.

Real PostgreSQL, Redis, API and Celery workers; the "started" event names the data path.
"""

from __future__ import annotations

from pathlib import Path

from swav_core.prepared import MANIFEST_FILE, is_prepared
from swav_service.layout import dataset_prepared_dir
from tests.api.helpers import settings_of
from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset
from tests.worker.test_recovery import events_of, wait_status
from tests.worker.test_resources import submit


def test_a_job_trains_from_the_prepared_copy(pg_service: Service, shapes_dir: Path) -> None:
    service = pg_service
    service.env["SWAV_POLL_INTERVAL_S"] = "0.2"
    service.env["SWAV_TRAIN_FROM_PREPARED"] = "true"
    service.start_api()
    service.start_worker("short")
    service.start_worker("train")
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]
        prepared = dataset_prepared_dir(settings_of(service), dataset_id)
        assert is_prepared(prepared)

        def trained_from() -> list[str]:
            job = submit(client, dataset_id, epochs=1).json()
            done = wait_status(client, service, job["id"], {"succeeded", "failed"}, 180)
            assert done["status"] == "succeeded", done
            assert done["progress"]["step"] == 4
            events = events_of(client, job["id"])
            assert not [e for e in events if e["type"] == "warning"]
            return [e["data"]["data_path"] for e in events if e["type"] == "started"]

        assert trained_from() == ["prepared"]
        (prepared / MANIFEST_FILE).unlink()  # an incomplete copy is never offered
        assert trained_from() == ["pil"]
