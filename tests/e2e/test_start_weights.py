"""Starting weights through the service: a job started from a previous job's final
checkpoint continues from it, and weights that do not fit fail the job with
`invalid_weights`. Real API, training and short-queue workers, PostgreSQL and Redis.

The quality of a checkpoint is computed from its weights on the job's dataset with a
fixed seed (swav_core/evaluate.py), so the child's step-0 checkpoint, which holds the
parent's final weights, scores what the parent's final checkpoint scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from swav_core.model import TinyCNN
from swav_core.synthetic import write_shapes_dataset
from tests.conftest import Service
from tests.e2e.test_quality import checkpoints_of
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for


def finished_job(client: httpx.Client, service: Service, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["status"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = wait_for(done, 240, f"job {job_id}", service)
    return result


def evaluated(
    client: httpx.Client, service: Service, job_id: str, step: int, final: bool
) -> dict[str, Any]:
    """The job's checkpoint at (`step`, `final`) once its quality report is in."""

    def ready() -> dict[str, Any] | None:
        rows = checkpoints_of(client, job_id)
        row = next((r for r in rows if (r["step"], r["final"]) == (step, final)), None)
        return row if row is not None and row["quality"] else None

    row: dict[str, Any] = wait_for(ready, 180, f"quality of {job_id} at step {step}", service)
    return row


def test_a_job_continues_from_its_parents_weights(pg_service: Service, tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "shapes", per_class=16, size=32)
    pg_service.start_api()
    pg_service.start_worker("short")
    pg_service.start_worker("train")
    with pg_service.client() as client:
        dataset = upload_ready_dataset(client, pg_service, data)
        config = {"epochs": 2}
        body = {"dataset_id": dataset["id"], "preset": "cpu-tiny", "config": config}
        parent = client.post("/v1/jobs", json=body).json()
        done = finished_job(client, pg_service, parent["id"])
        assert done["status"] == "succeeded", done
        final = evaluated(client, pg_service, parent["id"], done["progress"]["step"], True)

        child_body = body | {"config": config | {"checkpoint_at_start": True},
                             "start_from": {"checkpoint_id": final["id"]}}
        response = client.post("/v1/jobs", json=child_body)
        assert response.status_code == 201, response.text
        child = response.json()
        assert finished_job(client, pg_service, child["id"])["status"] == "succeeded"
        start = evaluated(client, pg_service, child["id"], 0, False)
        for metric in ("knn_top1", "linear_top1"):
            assert abs(start["quality"][metric] - final["quality"][metric]) <= 1e-6, metric
        # The quality of 12 validation images moves in steps of 1/12: the exports show
        # that the weights themselves are the parent's, to the bit.
        exports = [
            client.get(f"/v1/checkpoints/{row['id']}/download", params={"format": "backbone"})
            for row in (final, start)
        ]
        assert all(e.status_code == 200 for e in exports)
        parent_weights, start_weights = (safetensors_load(e.content) for e in exports)
        assert parent_weights.keys() == start_weights.keys()
        for key, value in parent_weights.items():
            assert torch.equal(start_weights[key], value), key
        events = client.get(f"/v1/jobs/{child['id']}/events").json()["data"]
        loaded = [e["data"]["loaded"] for e in events if e["type"] == "start_weights"]
        assert len(loaded) == 1 and loaded[0].startswith("the whole model (tiny_cnn")

        # A backbone state dict of another width: accepted at upload (a well-formed
        # safetensors file), refused when the job builds its model.
        narrow = {k: v.contiguous() for k, v in TinyCNN(width=8).state_dict().items()}
        uploaded = client.post("/v1/weights", content=safetensors_bytes(narrow),
                               headers={"Content-Type": "application/octet-stream"})
        assert uploaded.status_code == 201, uploaded.text
        response = client.post("/v1/jobs", json=body | {
            "start_from": {"weights_id": uploaded.json()["id"]}
        })
        assert response.status_code == 201, response.text
        failed = finished_job(client, pg_service, response.json()["id"])
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "invalid_weights", failed
        assert "features.0.weight is (8, 3, 3, 3), the model's is (16, 3, 3, 3)" in (
            failed["error"]["message"]
        )
        assert failed["attempt"] == 1  # not retried: the same file would fail again

        not_weights = client.post("/v1/weights", content=b"\x00" * 64)
        assert not_weights.status_code == 422
        assert not_weights.json()["error"]["code"] == "invalid_weights"
