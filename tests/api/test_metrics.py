"""`GET /metrics` against a live service: it parses as Prometheus text, and its values
move as a dataset is validated, a job waits in the queue, trains and succeeds, and
embeddings are served."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from swav_client import SwavClient
from swav_core.synthetic import write_shapes_dataset
from tests.conftest import Service

Samples = dict[str, list[Sample]]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 images of 32 px: one cpu-tiny step (batch 32) per epoch."""
    return write_shapes_dataset(tmp_path_factory.mktemp("tiny"), per_class=8, size=32)


def own_queues(service: Service) -> tuple[str, str]:
    """Queue names of this test alone (train, short), set before any process starts.

    Tests running at the same time can draw the same Redis db (tests/conftest.py picks one
    of 14), and the broker depth asserted here must count this test's messages only.
    """
    suffix = secrets.token_hex(4)
    train, short = f"train-{suffix}", f"short-{suffix}"
    service.env |= {"SWAV_TRAIN_QUEUE": train, "SWAV_SHORT_QUEUE": short}
    return train, short


def scrape(service: Service) -> Samples:
    """Every sample of /metrics (no key: Prometheus scrapes without one), by sample name."""
    response = httpx.get(f"{service.base_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample `name` whose labels include `labels`."""
    found = [s.value for s in samples.get(name, []) if labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def test_metrics_follow_a_job(pg_service: Service, tiny_shapes: Path) -> None:
    train, short = own_queues(pg_service)
    pg_service.start_api()
    start = time.time()
    before = scrape(pg_service)
    assert value(before, "swav_database_up") == 1 and value(before, "swav_broker_up") == 1
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert value(before, "swav_jobs", status=status) == 0
    assert value(before, "swav_job_duration_seconds_count", status="succeeded") == 0
    assert value(before, "swav_embeddings_served_total") == 0
    assert "process_resident_memory_bytes" in before

    with SwavClient(pg_service.base_url, api_key=pg_service.ensure_key()) as client:
        pg_service.start_worker(short)
        dataset = client.wait_dataset(client.upload_dataset(tiny_shapes).id, timeout_s=120)
        assert dataset.status == "ready", dataset

        # No training worker yet: the job waits, in the database and in Redis.
        job = client.create_job(dataset.id, preset="cpu-tiny", config={"epochs": 2})
        waiting = scrape(pg_service)
        assert value(waiting, "swav_jobs", status="queued") == 1
        assert value(waiting, "swav_queue_depth", queue=train, source="database") == 1
        assert value(waiting, "swav_queue_depth", queue=train, source="broker") == 1

        pg_service.start_worker(train)
        for _ in client.stream_events(job.id):
            pass
        job = client.get_job(job.id)
        assert job.status == "succeeded", pg_service.logs()
        embedded = client.embed(job.id, sorted(tiny_shapes.rglob("*.png"))[:3])
        assert embedded.vectors.shape[0] == 3
        for _ in range(2):
            client.get_job(job.id)
        missing = httpx.get(f"{pg_service.base_url}/v1/jobs/job_missing",
                            headers=pg_service.auth_headers)
        assert missing.status_code == 404

    after = scrape(pg_service)
    assert value(after, "swav_jobs", status="queued") == 0
    assert value(after, "swav_jobs", status="succeeded") == 1
    assert value(after, "swav_queue_depth", queue=train, source="database") == 0
    assert value(after, "swav_queue_depth", queue=train, source="broker") == 0
    assert value(after, "swav_job_duration_seconds_count", status="succeeded") == 1
    assert value(after, "swav_job_duration_seconds_sum", status="succeeded") == pytest.approx(
        job.compute_seconds)
    assert value(after, "swav_job_duration_seconds_bucket", status="succeeded", le="+Inf") == 1
    assert value(after, "swav_embeddings_served_total") == 3
    assert value(after, "swav_embedding_requests_total") == 1

    # Latency by route template: the job's id never becomes a label.
    assert value(after, "swav_http_request_duration_seconds_count", method="POST",
                 route="/v1/datasets", status="202") == 1
    assert value(after, "swav_http_request_duration_seconds_count", method="GET",
                 route="/v1/jobs/{job_id}", status="200") >= 3
    assert value(after, "swav_http_request_duration_seconds_count", method="GET",
                 route="/v1/jobs/{job_id}", status="404") == 1
    routes = {s.labels["route"] for s in after["swav_http_request_duration_seconds_count"]}
    assert not [r for r in routes if re.search(r"(job|ds|ckpt)_[0-9a-f]{16}|missing", r)], routes

    # Both workers' heartbeats, recent.
    seen = after["swav_worker_last_seen_timestamp_seconds"]
    assert {s.labels["queues"] for s in seen} == {short, train}
    assert all(start - 5 <= s.value <= time.time() + 5 for s in seen)
