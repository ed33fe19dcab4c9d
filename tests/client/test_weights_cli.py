"""`swav weights` and `swav jobs submit --start-from-*` against a live API (PostgreSQL,
Redis, uvicorn; no worker: the job stays queued, which is all submit needs)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from swav_client import SwavClient
from swav_client.types import Job, Weights
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from tests.api.helpers import add_dataset
from tests.client.test_client_cli import ok, swav
from tests.conftest import Service


def test_upload_weights_and_start_a_job_from_them(pg_service: Service, tmp_path: Path) -> None:
    pg_service.start_api()
    backbone = SwAVModel.from_config(config_from("cpu-tiny")).backbone
    path = tmp_path / "tiny-backbone.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, path,
              metadata={"backbone": "tiny_cnn"})

    uploaded = json.loads(ok(swav(pg_service, "--json", "weights", "upload", str(path))).stdout)
    assert uploaded["name"] == "tiny-backbone" and uploaded["backbone"] == "tiny_cnn"
    assert uploaded["size_bytes"] == path.stat().st_size
    listed = json.loads(ok(swav(pg_service, "--json", "weights", "list")).stdout)
    assert [w["id"] for w in listed["data"]] == [uploaded["id"]]

    dataset_id = add_dataset(pg_service)
    submit = ["--json", "jobs", "submit", "--dataset", dataset_id, "--preset", "cpu-tiny"]
    job = json.loads(ok(swav(pg_service, *submit, "--start-from-weights",
                             uploaded["id"])).stdout)
    assert job["start_from"] == {"checkpoint_id": None, "weights_id": uploaded["id"]}
    both = swav(pg_service, *submit, "--start-from-weights", "a", "--start-from-checkpoint", "b")
    assert both.returncode == 2 and "give one of" in both.stderr
    missing = swav(pg_service, *submit, "--start-from-checkpoint", "ckpt_0000000000000000")
    assert missing.returncode == 1
    assert json.loads(missing.stderr)["error"]["param"] == "start_from.checkpoint_id"

    with SwavClient(pg_service.base_url, api_key=pg_service.ensure_key()) as client:
        assert client.get_weights(uploaded["id"]).sha256 == uploaded["sha256"]
    with pg_service.client() as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
    # The client's types name only fields the server's schemas have.
    assert set(Weights.model_fields) <= set(schemas["WeightsPublic"]["properties"])
    assert set(Job.model_fields) <= set(schemas["JobPublic"]["properties"])

    ok(swav(pg_service, "weights", "delete", uploaded["id"]))
    gone = swav(pg_service, "weights", "show", uploaded["id"])
    assert gone.returncode == 1 and "404 not_found" in gone.stderr
