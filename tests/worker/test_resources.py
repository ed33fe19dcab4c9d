"""Job resources: a job of N ranks runs under torch's launcher, only on a worker that fits.

Real PostgreSQL, Redis, API and Celery workers; the 2-rank job runs as 2 CPU processes
(gloo) under `torch.distributed.run`, like the engine's own DDP test
(tests/core/test_trainer.py::test_two_gloo_ranks_match_one_process) but through the service.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import torch
from sqlalchemy import select

from swav_service.db import make_engine
from swav_service.models import Worker
from tests.conftest import Service
from tests.e2e.test_service_e2e import upload_ready_dataset
from tests.worker.test_recovery import events_of, job_of, wait_status

# As in tests/core/test_trainer.py::test_two_gloo_ranks_match_one_process: SGD at lr 0.01 with
# a global batch norm, where the rounding differences of 2 ranks stay near 5e-5 after
# its 4 steps (at lr 0.1 they grow ~10x per step).
EQUIVALENT = {
    "epochs": 1,
    "sync_bn": True,
    "deterministic": True,
    "base_lr": 0.01,
    "final_lr": 0.001,
    "freeze_prototypes": 0,
}


def submit(client: httpx.Client, dataset_id: str, gpus: int = 1, nodes: int = 1,
           **config: Any) -> httpx.Response:
    return client.post("/v1/jobs", json={
        "dataset_id": dataset_id, "preset": "cpu-tiny", "config": config,
        "resources": {"gpus": gpus, "nodes": nodes},
    })


def final_weights(client: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    listing = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    final = next(c for c in listing if c["final"])
    response = client.get(f"/v1/checkpoints/{final['id']}/download")
    assert response.status_code == 200
    state = torch.load(io.BytesIO(response.content), weights_only=True)
    return dict(state["model"])


def start_train_worker(service: Service, name: str, cpu_ranks: int) -> None:
    service.env["SWAV_WORKER_CPU_RANKS"] = str(cpu_ranks)
    try:
        service.start_worker("train", name=name)
    finally:
        del service.env["SWAV_WORKER_CPU_RANKS"]


def test_two_cpu_ranks_match_one_process_on_a_worker_that_fits(
    pg_service: Service, shapes_dir: Path
) -> None:
    service = pg_service
    service.env["SWAV_POLL_INTERVAL_S"] = "0.2"
    service.start_api()
    service.start_worker("short")
    with service.client() as client:
        dataset_id = upload_ready_dataset(client, service, shapes_dir)["id"]

        # cpu-tiny's batch of 32 does not split over 3 ranks.
        refused = submit(client, dataset_id, gpus=3, **EQUIVALENT)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "invalid_request"
        assert refused.json()["error"]["param"] == "resources"

        start_train_worker(service, "one-rank@test", cpu_ranks=1)
        two = submit(client, dataset_id, gpus=2, **EQUIVALENT).json()
        one = submit(client, dataset_id, gpus=1, **EQUIVALENT).json()
        assert two["resources"] == {"gpus": 2, "nodes": 1}
        done_one = wait_status(client, service, one["id"], {"succeeded", "failed"}, 180)
        assert done_one["status"] == "succeeded", done_one
        # The 1-rank worker took the later 1-rank job and never the 2-rank one.
        waiting = job_of(client, two["id"])
        assert waiting["status"] == "queued" and waiting["attempt"] == 0

        start_train_worker(service, "two-ranks@test", cpu_ranks=2)
        done_two = wait_status(client, service, two["id"], {"succeeded", "failed"}, 240)
        assert done_two["status"] == "succeeded", done_two
        assert done_two["progress"]["step"] == done_one["progress"]["step"] == 4

        started = [e["data"] for e in events_of(client, two["id"]) if e["type"] == "started"]
        assert [s["world_size"] for s in started] == [2]
        single, double = final_weights(client, one["id"]), final_weights(client, two["id"])
        for name, value in single.items():
            if value.is_floating_point():
                torch.testing.assert_close(double[name], value, rtol=0, atol=3e-4, msg=name)

    engine = make_engine(service.env["SWAV_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            offered = dict(connection.execute(select(Worker.name, Worker.resources)).all())
    finally:
        engine.dispose()

    def ranks(name: str) -> tuple[str, int] | None:
        row = offered.get(name)
        return (row["device"], row["ranks"]) if row else None

    assert ranks("one-rank@test") == ("cpu", 1)
    assert ranks("two-ranks@test") == ("cpu", 2)
