"""Quality reports and keep_best_by through the service: a real training job, a real
short-queue worker evaluating every checkpoint, PostgreSQL and Redis.

The job takes the default recipe (auto) with the smallest small ResNet. The data are the
mono shapes (light shapes on dark grounds): shape is the only cue, which an untrained
ResNet hardly separates (linear top-1 about 0.58) and 15 epochs of SwAV do (0.73-0.83
over two seeds); cpu-tiny's toy CNN starts at 0.81-0.92 and ends within noise of it.
With random colours SwAV does not learn shapes (the crops of one image share its
colours, and colour alone solves the swapped prediction; see swav_core/synthetic.py),
which is why this test does not use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from swav_core.synthetic import write_shapes_dataset
from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for


def checkpoints_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = client.get(
        f"/v1/jobs/{job_id}/checkpoints", params={"include_pruned": True}
    ).json()["data"]
    return rows


def test_trained_checkpoint_beats_step_0_and_the_best_is_kept(
    pg_service: Service, tmp_path: Path
) -> None:
    data = write_shapes_dataset(tmp_path / "mono", per_class=64, size=32, palette="mono")
    pg_service.start_api()
    pg_service.start_worker("short")
    pg_service.start_worker("train")
    with pg_service.client() as client:
        dataset = upload_ready_dataset(client, pg_service, data)
        assert dataset["num_images"] == 256
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "keep_best_by": "linear_top1",
            "config": {"backbone": "small_resnet10_w16", "epochs": 15,
                       "checkpoint_at_start": True, "checkpoint_every_epochs": 5, "keep_last": 2},
        })
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["keep_best_by"] == "linear_top1"

        def finished() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get(f"/v1/jobs/{job['id']}").json()
            return body if body["status"] in ("succeeded", "failed") else None

        done = wait_for(finished, 300, "the job", pg_service)
        assert done["status"] == "succeeded", done

        def all_evaluated() -> list[dict[str, Any]] | None:
            rows = checkpoints_of(client, job["id"])
            ready = len(rows) == 4 and all(r["quality"] for r in rows)
            return rows if ready and sum(r["best"] for r in rows) == 1 else None

        rows = wait_for(all_evaluated, 180, "every checkpoint evaluated", pg_service)

    by_step = {(r["step"], r["final"]): r for r in rows}
    assert sorted(by_step) == [(0, False), (40, False), (80, False), (120, True)]
    initial, final = by_step[(0, False)], by_step[(120, True)]
    assert final["quality"]["linear_top1"] > initial["quality"]["linear_top1"] + 0.05
    assert final["quality"]["n_val"] == initial["quality"]["n_val"] == 52

    best = next(r for r in rows if r["best"])
    assert best["quality"]["linear_top1"] == max(r["quality"]["linear_top1"] for r in rows)
    assert best["available"], "the best checkpoint must survive pruning"
    if not best["final"]:
        run = Path(pg_service.env["SWAV_DATA_DIR"]) / "artifacts" / "jobs" / job["id"] / "run"
        assert (run / "checkpoints" / f"step-{best['step']:09d}.pt.keep").exists()
    # keep_last=2: of the step checkpoints only the two newest and the best stay on disk.
    kept = {r["step"] for r in rows if r["available"] and not r["final"]}
    assert kept == {40, 80} | ({best["step"]} if not best["final"] else set())
    assert not initial["available"] or initial["best"]


def test_keep_best_by_needs_a_labelled_dataset(pg_service: Service, tmp_path: Path) -> None:
    flat = write_shapes_dataset(tmp_path / "flat", per_class=4, size=32, with_classes=False)
    pg_service.start_api()
    pg_service.start_worker("short")
    with pg_service.client() as client:
        dataset = upload_ready_dataset(client, pg_service, flat)
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "preset": "cpu-tiny", "keep_best_by": "knn_top1",
        })
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["param"] == "keep_best_by" and "class folders" in error["message"]
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"], "preset": "cpu-tiny", "keep_best_by": "accuracy",
        })
        assert response.status_code == 422
