"""`preset: auto`, `budget_s`, `dry_run` and `collapsed` through the service: real HTTP, a
live API, live Celery workers (the training worker reports its measured profile in its
heartbeat), PostgreSQL and Redis."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from swav_core.synthetic import write_shapes_dataset
from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for

# The budget counts from the training process's launch and covers its final checkpoint;
# the process's exit and the worker's bookkeeping after it (1-2 s here, measured) are
# outside it, which keeps a job within 5% of its budget from about a minute up.
BUDGET_S = 60.0


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
        events += page["data"]
        if not page["next_cursor"]:
            return events
        params = {"after": page["next_cursor"]}


def finished(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    return body if body["status"] in ("succeeded", "failed", "cancelled") else None


def test_dry_run_answers_the_plan_and_an_auto_job_keeps_its_budget(
    pg_service: Service, tmp_path: Path
) -> None:
    data = write_shapes_dataset(tmp_path / "mono", per_class=32, size=32, palette="mono")
    pg_service.start_api()
    pg_service.start_worker("short")
    pg_service.start_worker("train")
    with pg_service.client() as client:
        dataset = upload_ready_dataset(client, pg_service, data)
        assert dataset["stats"] == {"num_images": 128, "num_classes": 4,
                                    "median_short_side": 32, "grayscale_fraction": 1.0}
        request = {"dataset_id": dataset["id"], "config": {"budget_s": BUDGET_S}}

        def plan_with_worker() -> dict[str, Any] | None:
            response = client.post("/v1/jobs", json={**request, "dry_run": True})
            assert response.status_code == 200, response.text
            plan: dict[str, Any] = response.json()
            return plan if plan["estimates"][0]["workers"] == 1 else None

        plan = wait_for(plan_with_worker, 120, "the training worker's profile", pg_service)
        assert plan["dry_run"] is True and plan["preset"] == "auto"
        assert plan["config"]["budget_s"] == BUDGET_S
        assert plan["config"]["size_crops"] == [32, 24]  # small crops keep >= 24 px
        assert plan["config"]["n_prototypes"] == 40  # 10 per class, 4 class folders
        assert plan["reasons"]["budget_s"] == "given in the request"
        assert "class folders" in plan["reasons"]["n_prototypes"]
        assert "machine" not in plan["reasons"]  # a live worker's profile was used
        estimate = plan["estimates"][0]
        assert estimate["device"] == "cpu" and estimate["machine_gflops"] > 0
        assert estimate["total_seconds"] == BUDGET_S and estimate["fits_memory"]
        assert estimate["seconds_per_epoch"] > 0 and estimate["peak_memory_gib"] > 0
        assert client.get("/v1/jobs").json()["data"] == []  # the dry run queued nothing

        response = client.post("/v1/jobs", json=request)
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["preset"] == "auto" and job["config"] == plan["config"]
        done = wait_for(lambda: finished(client, job["id"]), 300, "the job", pg_service)
        assert done["status"] == "succeeded", done
        ran = (datetime.fromisoformat(done["finished_at"])
               - datetime.fromisoformat(done["started_at"])).total_seconds()
        events = all_events(client, job["id"])
        timeline = [(e["type"], e["data"].get("time"), e["created_at"]) for e in events
                    if e["type"] not in ("metrics", "epoch", "checkpoint")]
        assert abs(ran - BUDGET_S) <= 0.05 * BUDGET_S, (ran, done["started_at"], timeline)
        assert done["progress"]["step"] == done["progress"]["total_steps"]
        kinds = [e["type"] for e in events]
        assert kinds[0] == "plan" and "budget_fitted" in kinds


def test_a_job_whose_features_collapse_fails_with_collapsed(
    pg_service: Service, tmp_path: Path
) -> None:
    # Black images give every crop the same pixels, so the features cannot but collapse.
    # A mid gray does not: a grayscale crop of it is 0.9999 as bright (torchvision's luma
    # weights sum to 0.9999), a real difference the network may learn to tell apart,
    # and whether it does depends on the machine's float rounding.
    folder = tmp_path / "black" / "all"
    folder.mkdir(parents=True)
    for i in range(64):
        Image.new("RGB", (32, 32), (0, 0, 0)).save(folder / f"{i}.png")
    pg_service.start_api()
    pg_service.start_worker("train,short")
    with pg_service.client() as client:
        dataset = upload_ready_dataset(client, pg_service, folder.parent)
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "preset": "cpu-tiny",
            "config": {"epochs": 40, "color_jitter_strength": 0.0}})
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        done = wait_for(lambda: finished(client, job_id), 300, "the job", pg_service)
        assert done["status"] == "failed" and done["error"]["code"] == "collapsed", done
        assert "collapsed" in done["error"]["message"]
        events = all_events(client, job_id)
        assert [e["data"]["attempt"] for e in events if e["type"] == "collapse_recovery"] == [1, 2]
        assert done["attempt"] == 1  # a collapse is not retried: it would repeat
