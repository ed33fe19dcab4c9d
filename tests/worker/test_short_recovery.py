"""A short worker killed with -9 mid-ingestion: the dataset does not stay `validating`.

Real PostgreSQL, Redis, API and Celery short workers; the kill is a real SIGKILL of the
worker's process group, sent once the worker's claim on the dataset is in the database
(so the ingestion is under way), and the archive is large enough (many small images)
that the ingestion is still running then. Short-task leases last a few seconds so that
the reconciler of the next worker repairs the row within the test.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from swav_service.db import make_engine
from swav_service.models import Dataset
from tests.conftest import Service
from tests.e2e.test_service_e2e import wait_for
from tests.worker.test_recovery import FAST_LEASES, kill_9

# 4 classes x COPIES: extracting and scanning them takes seconds, so the kill (sent within
# a poll, 0.05 s, of the claim) lands mid-ingestion.
COPIES = 3000


@pytest.fixture
def service(pg_service: Service) -> Service:
    pg_service.env.update(FAST_LEASES | {"SWAV_SHORT_TASK_LEASE_S": "3"})
    return pg_service


@pytest.fixture
def engine(service: Service) -> Iterator[Engine]:
    engine = make_engine(service.env["SWAV_DATABASE_URL"])
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def big_archive(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A zip of 4 class folders, each with COPIES copies of 2 small shape images."""
    from swav_core.synthetic import write_shapes_dataset

    root = write_shapes_dataset(tmp_path_factory.mktemp("few"), per_class=2, size=32)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*.png")):
            data = path.read_bytes()
            for copy in range(COPIES // 2):
                archive.writestr(f"shapes/{path.parent.name}/{copy}-{path.name}", data)
    return buffer.getvalue()


def claim_of(engine: Engine, dataset_id: str) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(Dataset.status, Dataset.task_token, Dataset.task_attempts,
                   Dataset.task_lease_expires_at).where(Dataset.id == dataset_id)
        ).one()


def upload_and_kill_mid_ingestion(
    service: Service, client: httpx.Client, engine: Engine, archive: bytes
) -> str:
    """Upload `archive`, SIGKILL the short worker once it holds the claim; the dataset id."""
    worker = service.start_worker("short", name="short-a@test")
    response = client.post("/v1/datasets", files={"file": ("big.zip", archive, "application/zip")})
    assert response.status_code == 202, response.text
    dataset_id: str = response.json()["id"]

    def claimed() -> bool:
        return bool(claim_of(engine, dataset_id).task_lease_expires_at is not None)

    wait_for(claimed, 60, "the worker's claim on the dataset", service, every=0.05)
    kill_9(worker)
    killed = claim_of(engine, dataset_id)
    assert (killed.status, killed.task_attempts) == ("validating", 1), "killed too late"
    return dataset_id


def test_kill_9_mid_ingestion_is_ingested_again_by_another_worker(
    service: Service, engine: Engine, big_archive: bytes
) -> None:
    service.start_api()
    with service.client() as client:
        dataset_id = upload_and_kill_mid_ingestion(service, client, engine, big_archive)
        service.start_worker("short", name="short-b@test")

        def ended() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()
            return body if body["status"] != "validating" else None

        done = wait_for(ended, 120, "the dataset to leave validating", service)
        assert done["status"] == "ready", done
        assert done["num_images"] == 4 * COPIES and done["num_skipped"] == 0
        assert len(done["classes"]) == 4
        # claim 1 (token 1), requeued by the reconciler (2), claimed again (3)
        after = claim_of(engine, dataset_id)
        assert (after.task_token, after.task_attempts, after.task_lease_expires_at) == (
            3, 2, None)
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204


def test_kill_9_on_the_last_attempt_fails_the_dataset_with_worker_lost(
    service: Service, engine: Engine, big_archive: bytes
) -> None:
    service.env["SWAV_SHORT_TASK_MAX_ATTEMPTS"] = "1"
    service.start_api()
    with service.client() as client:
        dataset_id = upload_and_kill_mid_ingestion(service, client, engine, big_archive)
        service.start_worker("short", name="short-b@test")

        def ended() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()
            return body if body["status"] != "validating" else None

        done = wait_for(ended, 60, "the dataset to leave validating", service)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == "worker_lost"
        assert "lost (killed, or it stopped renewing its claim) once" in done["error"]["message"]
        assert "SWAV_SHORT_TASK_MAX_ATTEMPTS" in done["error"]["message"]
        assert claim_of(engine, dataset_id).task_attempts == 1  # not ingested again
        assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
