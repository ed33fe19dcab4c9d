"""Checkpoints: listing and downloads in each format.

Over real HTTP, on the module's API (tests/api/conftest.py); what a worker would write
is written into its database directly (tests/api/helpers.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx

from swav_service.models import Checkpoint, new_id
from tests.api.conftest import assert_error
from tests.api.helpers import (
    add_dataset,
    create_job,
    db,
    settings_of,
)
from tests.conftest import Service

# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_downloads(api: Service, client: httpx.Client, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load as load_safetensors

    from swav_core.checkpoint import save_checkpoint
    from swav_core.config import TrainConfig
    from swav_core.model import SwAVModel
    from swav_core.presets import config_from

    settings = settings_of(api)
    job_id = create_job(client, add_dataset(api))["id"]
    config = config_from("cpu-tiny")
    model = SwAVModel.from_config(config)
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
    info = save_checkpoint(settings.job_dir(job_id) / "run", state, step=8, keep_last=2, final=True)
    assert info.sha256 is not None and info.size is not None
    final_id, pruned_id, missing_id = new_id("ckpt"), new_id("ckpt"), new_id("ckpt")
    with db(api) as session:
        common = {"job_id": job_id, "epoch": 1, "sha256": info.sha256, "size_bytes": info.size}
        relative = str(info.path.relative_to(settings.artifacts))
        session.add(
            Checkpoint(
                id=pruned_id,
                step=4,
                final=False,
                available=False,
                path=relative.replace("final", "step-4"),
                **common,
            )
        )
        session.flush()
        session.add(
            Checkpoint(
                id=missing_id,
                step=6,
                final=False,
                available=True,
                path=relative.replace("final", "step-6"),
                **common,
            )
        )
        session.flush()
        session.add(
            Checkpoint(
                id=final_id, step=8, final=True, path=relative, metrics={"loss": 2.5}, **common
            )
        )

    listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert [c["id"] for c in listed["data"]] == [final_id, missing_id]  # pruned ones hidden
    final = listed["data"][0]
    assert final == client.get(f"/v1/checkpoints/{final_id}").json()
    assert final["sha256"] == info.sha256 and final["metrics"] == {"loss": 2.5}

    url = f"/v1/checkpoints/{final_id}/download"
    full = client.get(url, params={"format": "full"})
    assert full.status_code == 200
    assert hashlib.sha256(full.content).hexdigest() == full.headers["X-Checksum-SHA256"]
    assert full.headers["X-Checksum-SHA256"] == info.sha256 and len(full.content) == info.size
    assert client.get(url).content == full.content  # `full` is the default

    exported = client.get(url, params={"format": "safetensors"})
    assert exported.status_code == 200, exported.text
    assert hashlib.sha256(exported.content).hexdigest() == exported.headers["X-Checksum-SHA256"]
    tensors = load_safetensors(exported.content)
    assert set(tensors) == set(model.state_dict())
    assert all((tensors[k] == v).all() for k, v in model.state_dict().items())
    (tmp_path / "model.safetensors").write_bytes(exported.content)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as file:
        assert TrainConfig.model_validate_json(file.metadata()["swav_config"]) == config
    assert info.path.with_name("final.model.safetensors").is_file()  # cached beside it

    backbone = client.get(url, params={"format": "backbone"})
    assert backbone.status_code == 200, backbone.text
    fresh = SwAVModel.from_config(config).backbone
    fresh.load_state_dict(load_safetensors(backbone.content), strict=True)
    assert info.path.with_name("final.backbone.safetensors").is_file()

    message = assert_error(
        client.get(url, params={"format": "onnx"}), 422, "invalid_request", "format"
    )
    assert "onnx" not in message
    for gone in (pruned_id, missing_id):
        response = client.get(f"/v1/checkpoints/{gone}/download")
        assert_error(response, 410, "checkpoint_gone", "checkpoint_id")
