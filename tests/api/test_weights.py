"""Uploaded weights and a job's `start_from`: upload, list, read, delete, the format check,
the size cap, storage accounting, and the 404 / 410 / 422 answers at submit.

Over real HTTP, on the module's API (tests/api/conftest.py); checkpoints a worker would
record are written into its database directly (tests/api/helpers.py).
"""

from __future__ import annotations

import json
import struct

import httpx
import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from swav_core.checkpoint import save_checkpoint
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_service.models import Checkpoint, new_id
from tests.api.conftest import Deployment, assert_error
from tests.api.helpers import add_dataset, create_job, db, settings_of
from tests.conftest import Service

MAX_WEIGHTS_BYTES = 200_000


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_MAX_WEIGHTS_BYTES": str(MAX_WEIGHTS_BYTES)}


def tiny_backbone(metadata: dict[str, str] | None = None) -> bytes:
    """cpu-tiny's backbone (tiny_cnn) as a safetensors state dict."""
    backbone = SwAVModel.from_config(config_from("cpu-tiny")).backbone
    tensors = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    return safetensors_bytes(tensors, metadata)


def upload(client: httpx.Client, data: bytes, name: str | None = None) -> httpx.Response:
    params = {"name": name} if name else {}
    headers = {"Content-Type": "application/octet-stream"}
    return client.post("/v1/weights", content=data, params=params, headers=headers)


def test_upload_list_read_delete_and_usage(deployment: Deployment) -> None:
    _, client = deployment.new_tenant()
    with client:
        data = tiny_backbone({"backbone": "tiny_cnn"})
        response = upload(client, data, name="tiny")
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["name"] == "tiny" and body["backbone"] == "tiny_cnn"
        assert body["size_bytes"] == len(data)
        assert body["num_tensors"] == len(SwAVModel.from_config(config_from("cpu-tiny"))
                                          .backbone.state_dict())
        assert client.get(f"/v1/weights/{body['id']}").json() == body
        assert [w["id"] for w in client.get("/v1/weights").json()["data"]] == [body["id"]]
        assert client.get("/v1/usage").json()["weights_bytes"] == len(data)
        path = deployment.artifacts / "weights" / f"{body['id']}.safetensors"
        assert path.read_bytes() == data

        _, other = deployment.new_tenant()
        with other:
            assert_error(other.get(f"/v1/weights/{body['id']}"), 404, "not_found", "weights_id")
            assert other.get("/v1/weights").json()["data"] == []

        assert client.delete(f"/v1/weights/{body['id']}").status_code == 204
        assert not path.exists()
        assert client.get("/v1/usage").json()["weights_bytes"] == 0
        assert_error(client.get(f"/v1/weights/{body['id']}"), 404, "not_found", "weights_id")


def test_a_file_that_is_not_safetensors_is_refused(deployment: Deployment) -> None:
    _, client = deployment.new_tenant()
    with client:
        message = assert_error(upload(client, b"PK\x03\x04 a zip, not weights"), 422,
                               "invalid_weights")
        assert "expected a safetensors file" in message
        # A header whose tensors claim more bytes than the file has: caught without torch.
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
        truncated = struct.pack("<Q", len(header)) + header.encode() + b"\0" * 8
        message = assert_error(upload(client, truncated), 422, "invalid_weights")
        assert "the tensors end at data byte 16, the file's data has 8" in message
        big = safetensors_bytes({"w": torch.zeros(MAX_WEIGHTS_BYTES // 4 + 1)})
        message = assert_error(upload(client, big), 413, "payload_too_large")
        assert "SWAV_MAX_WEIGHTS_BYTES" in message
        assert client.get("/v1/weights").json()["data"] == []
        assert not any((deployment.artifacts / "weights").glob("*"))


def test_start_from_is_checked_at_submit(api: Service, deployment: Deployment) -> None:
    tenant, client = deployment.new_tenant()
    with client:
        dataset_id = add_dataset(api, tenant=tenant)

        def submit(start_from: dict[str, str], **config: object) -> httpx.Response:
            body = {"dataset_id": dataset_id, "preset": "cpu-tiny",
                    "config": {"epochs": 1, **config}, "start_from": start_from}
            return client.post("/v1/jobs", json=body)

        assert_error(submit({"checkpoint_id": "ckpt_nope"}), 404, "not_found",
                     "start_from.checkpoint_id")
        assert_error(submit({"weights_id": "wts_nope"}), 404, "not_found",
                     "start_from.weights_id")
        assert_error(submit({}), 422, "invalid_request", "start_from")
        assert_error(submit({"checkpoint_id": "a", "weights_id": "b"}), 422,
                     "invalid_request", "start_from")

        # Weights whose metadata names another backbone than the job's: 422 at submit.
        tagged = upload(client, tiny_backbone({"backbone": "tiny_cnn"})).json()
        message = assert_error(submit({"weights_id": tagged["id"]},
                                      backbone="small_resnet10_w16"),
                               422, "invalid_weights", "start_from.weights_id")
        assert "set config.backbone to 'tiny_cnn'" in message
        job = submit({"weights_id": tagged["id"]}).json()
        assert job["start_from"] == {"checkpoint_id": None, "weights_id": tagged["id"]}

        # Another tenant's weights read as missing.
        other_tenant, other = deployment.new_tenant()
        others = upload(other, tiny_backbone()).json()
        assert_error(submit({"weights_id": others["id"]}), 404, "not_found",
                     "start_from.weights_id")

        # A checkpoint: on disk, pruned, and of a run with another backbone.
        settings = settings_of(api)
        parent = create_job(client, dataset_id)
        config = config_from("cpu-tiny")
        state = {"model": SwAVModel.from_config(config).state_dict(),
                 "config": config.model_dump(mode="json")}
        info = save_checkpoint(settings.job_dir(parent["id"]) / "run", state, step=4, keep_last=2)
        kept, pruned = new_id("ckpt"), new_id("ckpt")
        with db(api) as session:
            for checkpoint_id, step, available in ((kept, 4, True), (pruned, 2, False)):
                session.add(Checkpoint(
                    id=checkpoint_id, job_id=parent["id"], step=step, epoch=1, final=False,
                    path=str(info.path.relative_to(settings.artifacts)), size_bytes=info.size,
                    sha256=info.sha256, available=available,
                ))
        message = assert_error(submit({"checkpoint_id": pruned}), 410, "checkpoint_gone",
                               "start_from.checkpoint_id")
        assert pruned in message
        message = assert_error(submit({"checkpoint_id": kept}, backbone="small_resnet10_w16"),
                               422, "invalid_weights", "start_from.checkpoint_id")
        assert "holds a 'tiny_cnn' backbone" in message
        child = submit({"checkpoint_id": kept})
        assert child.status_code == 201, child.text
        assert child.json()["start_from"] == {"checkpoint_id": kept, "weights_id": None}
        body = {"dataset_id": add_dataset(api, tenant=other_tenant),
                "preset": "cpu-tiny", "start_from": {"checkpoint_id": kept}}
        try:
            assert_error(other.post("/v1/jobs", json=body), 404, "not_found",
                         "start_from.checkpoint_id")
        finally:
            other.close()
