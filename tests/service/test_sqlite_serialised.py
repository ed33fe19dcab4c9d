"""Embedded mode (SQLite): the check-then-insert sections are serialised as on PostgreSQL.

SQLite's default (deferred) transactions let two requests both read a count that leaves
one slot and both insert; the limit sections start their transaction with BEGIN
IMMEDIATE, so the second waits for the first's commit and reads its row.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy.orm import Session

from swav_service.db import make_engine
from swav_service.models import Dataset, new_id
from tests.conftest import Service

REQUESTS = 12


def ready_dataset(data_dir: Path) -> str:
    engine = make_engine(f"sqlite:///{(data_dir / 'swav.db').resolve()}")
    dataset_id = new_id("ds")
    with Session(engine) as session:
        session.add(Dataset(id=dataset_id, tenant="local", name="shapes", status="ready",
                            archive_bytes=1000, num_images=128, num_skipped=0,
                            classes=["a", "b"]))
        session.commit()
    engine.dispose()
    return dataset_id


def test_concurrent_creates_cannot_both_take_the_last_job_slot(
    embedded_service: Service,
) -> None:
    embedded_service.env["SWAV_TENANT_MAX_ACTIVE_JOBS"] = "1"
    embedded_service.start_api()
    dataset_id = ready_dataset(embedded_service.data_dir)
    barrier = threading.Barrier(REQUESTS)
    codes: list[int] = []

    def create() -> None:
        with embedded_service.client() as client:
            barrier.wait()
            response = client.post("/v1/jobs", json={
                "dataset_id": dataset_id, "preset": "cpu-tiny", "config": {"epochs": 1}})
            codes.append(response.status_code)

    threads = [threading.Thread(target=create) for _ in range(REQUESTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [201] + [429] * (REQUESTS - 1), codes
    with embedded_service.client() as client:
        assert len(client.get("/v1/jobs").json()["data"]) == 1
