"""Jobs: config validation and limits, creation, idempotency, pagination, cancel and
resume.

Over real HTTP, on the module's API (tests/api/conftest.py); what a worker would write
is written into its database directly (tests/api/helpers.py).
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from swav_service.models import Job
from tests.api.conftest import assert_error
from tests.api.helpers import (
    add_dataset,
    broker_length,
    create_job,
    db,
    dispose_engine,
    set_job,
)
from tests.conftest import Service


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_POLL_INTERVAL_S": "0.05", "SWAV_MAX_NUM_WORKERS": "8"}

# --------------------------------------------------------------------------- jobs


@pytest.mark.parametrize(
    ("body", "param", "phrase"),
    [
        ({"preset": "cpu-tiny", "config": {"n_prototypes": 1}}, "config.n_prototypes", "2"),
        ({"preset": "cpu-tiny", "config": {"epsilon": 0}}, "config.epsilon", "greater than 0"),
        ({"preset": "cpu-tiny", "config": {"queue_length": 100}}, "config.queue_length", "96"),
        ({"config": {"learning_rate": 0.1}}, "config.learning_rate", "unknown field"),
        ({"config": {"preset": "cpu-tiny"}}, "config.preset", "unknown field"),
        ({"preset": "huge"}, "preset", "cpu-tiny"),
        ({"config": {"n_crops": [2, 6], "size_crops": [224]}}, "config.size_crops", "1 entries"),
        ({"preset": "cpu-tiny", "config": {"backbone": "resnet5"}}, "config.backbone",
         "unknown backbone 'resnet5'; did you mean resnet50"),
        ({"preset": "cpu-tiny", "config": {"backbone": "timm/convnxt_atto"}}, "config.backbone",
         "did you mean timm/convnext_atto"),
        ({"preset": "cpu-tiny", "config": {"backbone": "timm/convnext_atto.d2_in1k"}},
         "config.backbone", "no weights are downloaded: use 'timm/convnext_atto'"),
        ({"preset": "cpu-tiny", "config": {"backbone": "keras/resnet50"}}, "config.backbone",
         "GET /v1/backbones"),
        ({"preset": "cpu-tiny", "config": {"backbone": "timm/convnext_atto"}},
         "config.size_crops", "backbone timm/convnext_atto cannot take 24 px crops"),
        ({"preset": "cpu-tiny", "config": {"backbone": "torchvision/vit_b_16",
                                           "size_crops": [224, 96]}},
         "config.size_crops", "Expected 224 but got 96"),
        # What a deployment allows (swav_service/config_limits.py), each with its setting.
        ({"preset": "cpu-tiny", "config": {"size_crops": [8192, 24]}}, "config.size_crops",
         "a crop side of 8192 px is more than this deployment allows (at most 1024; the "
         "setting SWAV_MAX_CROP_PX)"),
        ({"preset": "cpu-tiny", "config": {"num_workers": 9}}, "config.num_workers",
         "(at most 8; the setting SWAV_MAX_NUM_WORKERS)"),
        ({"preset": "cpu-tiny", "config": {"epochs": 2**31}}, "config.epochs",
         "SWAV_MAX_TOTAL_STEPS"),
        ({"preset": "cpu-tiny", "config": {"epochs": 30_000_000}}, "config.epochs",
         "120000000 steps in all"),  # 128 images / batch 32 = 4 steps per epoch
        ({"preset": "cpu-tiny", "config": {"n_crops": [2, 40], "size_crops": [32, 24],
          "min_scale_crops": [0.4, 0.2], "max_scale_crops": [1.0, 0.5]}}, "config.n_crops",
         "42 crops per image"),
        ({"preset": "cpu-tiny", "config": {"checkpoint_every_steps": 1, "epochs": 5000}},
         "config.checkpoint_every_steps", "SWAV_MAX_CHECKPOINTS_PER_JOB"),
        ({"preset": "cpu-tiny", "config": {"sinkhorn_iterations": 10_000}},
         "config.sinkhorn_iterations", "SWAV_MAX_SINKHORN_ITERATIONS"),
    ],
)
def test_invalid_config_is_422(
    api: Service, client: httpx.Client, body: dict[str, Any], param: str, phrase: str
) -> None:
    dataset_id = add_dataset(api)
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, **body})
    message = assert_error(response, 422, "invalid_config", param)
    assert message.startswith(f"{param}: ") and phrase in message
    with db(api) as session:
        assert session.scalar(select(func.count()).where(Job.dataset_id == dataset_id)) == 0


def test_a_config_at_the_deployments_limit_is_accepted(api: Service, client: httpx.Client) -> None:
    """The bound is the setting's value (SWAV_MAX_NUM_WORKERS=8 in this module), inclusive."""
    body = {"dataset_id": add_dataset(api), "preset": "cpu-tiny", "dry_run": True,
            "config": {"num_workers": 8, "size_crops": [1024, 24]}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["config"]["num_workers"] == 8


def test_invalid_job_requests(api: Service, client: httpx.Client) -> None:
    ready = add_dataset(api)
    response = client.post("/v1/jobs", json={"dataset_id": ready, "foo": 1})
    assert "unknown field" in assert_error(response, 422, "invalid_request", "foo")
    response = client.post("/v1/jobs", json={"preset": "cpu-tiny"})
    assert assert_error(response, 422, "invalid_request", "dataset_id").endswith("required")
    response = client.post("/v1/jobs", json={"dataset_id": ready, "config": [1, 2]})
    assert_error(response, 422, "invalid_request", "config")
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "invalid_request")
    long_name = "n" * 5000
    response = client.post("/v1/jobs", json={"dataset_id": ready, "name": long_name})
    assert_error(response, 422, "invalid_request", "name")
    assert long_name not in response.text  # inputs are never echoed

    response = client.post("/v1/jobs", json={"dataset_id": "ds_nope", "preset": "cpu-tiny"})
    assert_error(response, 404, "not_found", "dataset_id")
    for status in ("validating", "failed"):
        dataset_id = add_dataset(api, status=status)
        response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "preset": "cpu-tiny"})
        assert status in assert_error(response, 409, "dataset_not_ready", "dataset_id")


def test_create_job(api: Service, client: httpx.Client) -> None:
    from swav_core.presets import config_from

    dataset_id = add_dataset(api)
    before = broker_length(api, "train")
    job = create_job(client, dataset_id, name="run 1", metadata={"owner": "me", "tags": [1]})
    assert job["status"] == "queued" and job["name"] == "run 1" and job["dataset_id"] == dataset_id
    assert job["config"] == config_from("cpu-tiny", epochs=2).model_dump(mode="json")
    assert job["progress"] == {"step": 0, "total_steps": None, "epoch": 0, "epochs": 2}
    assert job["metadata"] == {"owner": "me", "tags": [1]}
    assert job["attempt"] == 0 and job["error"] is None and job["compute_seconds"] == 0
    assert job["started_at"] is None and job["finished_at"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    assert broker_length(api, "train") == before + 1  # enqueue_job sent the task
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [(e["seq"], e["type"], e["data"]) for e in events["data"]] == [
        (1, "state", {"status": "queued"})
    ]


def test_a_job_stored_before_a_config_rename_is_shown_with_the_new_name(
    api: Service, client: httpx.Client
) -> None:
    """A config written by version 1 (`nmb_crops`, no `config_version`) reads as the current
    version: the row is not migrated, the API answers the current names."""
    job = create_job(client, add_dataset(api))
    stored = {k: v for k, v in job["config"].items() if k != "config_version"}
    stored["nmb_crops"] = stored.pop("n_crops")
    set_job(api, job["id"], config=stored)
    shown = client.get(f"/v1/jobs/{job['id']}").json()["config"]
    assert shown == job["config"]
    assert (shown["config_version"], shown["n_crops"]) == (2, [2, 2])


def test_idempotency_key(api: Service, client: httpx.Client) -> None:
    dataset_id = add_dataset(api)
    body = {"dataset_id": dataset_id, "preset": "cpu-tiny", "name": "once"}
    headers = {"Idempotency-Key": f"key-{secrets.token_hex(4)}"}
    before = broker_length(api, "train")
    first = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201
    set_job(api, first.json()["id"], status="running")  # the replay is of the first answer
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 201 and again.json() == first.json()
    with db(api) as session:
        assert session.scalar(select(func.count()).where(Job.dataset_id == dataset_id)) == 1
    assert broker_length(api, "train") == before + 1

    response = client.post("/v1/jobs", json={**body, "name": "other"}, headers=headers)
    assert_error(response, 409, "idempotency_conflict", "Idempotency-Key")
    other = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "another"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_pagination_and_status_filter(pg_service: Service) -> None:
    pg_service.start_api()
    dataset_id = add_dataset(pg_service)
    with pg_service.client() as client:
        created = [create_job(client, dataset_id, name=f"job {i}")["id"] for i in range(5)]
        pages: list[list[str]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/jobs", params=params).json()
            pages.append([j["id"] for j in page["data"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [2, 2, 1]
        assert [i for p in pages for i in p] == created[::-1]  # newest first, no repeats

        for job_id in created[:2]:
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

        def ids(status: str) -> list[str]:
            page = client.get("/v1/jobs", params={"status": status})
            assert page.status_code == 200, page.text
            return [j["id"] for j in page.json()["data"]]

        assert ids("cancelled") == created[1::-1]
        assert ids("queued") == created[:1:-1]
        assert ids("queued,cancelled") == created[::-1]
        assert ids("running") == []

        first = client.get("/v1/datasets", params={"limit": 1}).json()
        assert [d["id"] for d in first["data"]] == [dataset_id] and first["next_cursor"] is None
    dispose_engine(pg_service)


def test_cancel_and_resume(api: Service, client: httpx.Client) -> None:
    dataset_id = add_dataset(api)
    job_id = create_job(client, dataset_id)["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    message = assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished", "job_id")
    assert "cancelled" in message

    before = broker_length(api, "train")
    resumed = client.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 202
    assert resumed.json()["status"] == "queued" and resumed.json()["finished_at"] is None
    assert broker_length(api, "train") == before + 1
    response = client.post(f"/v1/jobs/{job_id}/resume")
    assert_error(response, 409, "job_not_resumable", "job_id")
    events = client.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert [e["data"] for e in events] == [
        {"status": "queued"},
        {"status": "cancelled"},
        {"status": "queued", "resumed": True},
    ]

    # A running job is asked to stop; the worker finishes the cancel.
    set_job(api, job_id, status="running")
    cancelling = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelling.status_code == 202 and cancelling.json()["status"] == "cancelling"
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "cancelling"
    with db(api) as session:
        assert session.get(Job, job_id).cancel_requested_at is not None  # type: ignore[union-attr]

    set_job(api, job_id, status="failed", error_code="worker_lost", error_message="died",
            attempt=3, max_attempts=3)
    assert client.get(f"/v1/jobs/{job_id}").json()["error"] == {
        "code": "worker_lost",
        "message": "died",
    }
    resumed = client.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.status_code == 202 and resumed.json()["error"] is None
    assert resumed.json()["attempt"] == 0  # a fresh budget: its next crash is retried

    set_job(api, job_id, status="succeeded")
    assert_error(client.post(f"/v1/jobs/{job_id}/resume"), 409, "job_not_resumable", "job_id")
    assert_error(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "job_finished", "job_id")
