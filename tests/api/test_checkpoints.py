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
    import numpy as np
    import onnxruntime
    import torch
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

    assert final["export_formats"] == ["full", "safetensors", "backbone", "onnx"]
    message = assert_error(
        client.get(url, params={"format": "timm"}), 422, "invalid_request", "format"
    )
    assert "use one of full, safetensors, backbone, onnx" in message
    assert not info.path.with_name("final.timm.safetensors").exists()
    assert_error(client.get(url, params={"format": "pickle"}), 422, "invalid_request", "format")

    onnx_file = client.get(url, params={"format": "onnx"})
    assert onnx_file.status_code == 200, onnx_file.text
    assert hashlib.sha256(onnx_file.content).hexdigest() == onnx_file.headers["X-Checksum-SHA256"]
    assert onnx_file.headers["content-disposition"].endswith('-final.onnx"')
    cached = info.path.with_name("final.onnx")
    assert cached.read_bytes() == onnx_file.content  # cached beside the checkpoint
    with db(api) as session:
        row = session.get(Checkpoint, final_id)
        assert row is not None
        expected = sum(
            p.stat().st_size
            for p in info.path.parent.iterdir()
            if p.name.startswith("final.") and p.name != "final.pt"
        )
        assert row.extra_bytes == expected > cached.stat().st_size  # sidecar and all exports
    session_onnx = onnxruntime.InferenceSession(
        onnx_file.content, providers=["CPUExecutionProvider"]
    )
    model.eval()
    for batch in (2, 3):
        images = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ours = model.backbone(images).numpy()
        theirs = session_onnx.run(["features"], {"images": images.numpy()})[0]
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
    for gone in (pruned_id, missing_id):
        response = client.get(f"/v1/checkpoints/{gone}/download")
        assert_error(response, 410, "checkpoint_gone", "checkpoint_id")


def test_timm_checkpoint_downloads_for_timm(api: Service, client: httpx.Client) -> None:
    """A timm backbone's checkpoint offers `timm` (loaded by timm's own loader) instead of
    `backbone`, which is a 422 naming the formats that apply."""
    import timm
    import torch
    from safetensors import safe_open

    from swav_core.checkpoint import save_checkpoint
    from swav_core.config import TrainConfig
    from swav_core.model import SwAVModel

    settings = settings_of(api)
    overrides = {"backbone": "timm/convnext_atto", "size_crops": [64, 32], "hidden_mlp": 16}
    job = create_job(client, add_dataset(api), config={"epochs": 1, **overrides})
    config = TrainConfig.model_validate(job["config"])
    assert config.backbone == "timm/convnext_atto"
    torch.manual_seed(0)
    model = SwAVModel.from_config(config)
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
    info = save_checkpoint(settings.job_dir(job["id"]) / "run", state, step=2, keep_last=2)
    assert info.sha256 is not None and info.size is not None
    checkpoint_id = new_id("ckpt")
    with db(api) as session:
        session.add(
            Checkpoint(
                id=checkpoint_id, job_id=job["id"], step=2, epoch=1, sha256=info.sha256,
                size_bytes=info.size, path=str(info.path.relative_to(settings.artifacts)),
            )
        )  # fmt: skip

    shown = client.get(f"/v1/checkpoints/{checkpoint_id}").json()
    assert shown["export_formats"] == ["full", "safetensors", "timm", "onnx"]
    url = f"/v1/checkpoints/{checkpoint_id}/download"
    message = assert_error(
        client.get(url, params={"format": "backbone"}), 422, "invalid_request", "format"
    )
    assert "use one of full, safetensors, timm, onnx" in message

    downloaded = client.get(url, params={"format": "timm"})
    assert downloaded.status_code == 200, downloaded.text
    assert downloaded.headers["content-disposition"].endswith('.timm.safetensors"')
    path = info.path.with_name(info.path.stem + ".timm.safetensors")  # cached beside it
    assert path.read_bytes() == downloaded.content
    with safe_open(str(path), framework="pt") as file:
        assert file.metadata()["timm_kwargs"] == "{}"  # a CNN: no image size to give
    loaded = timm.create_model(
        "convnext_atto", pretrained=False, num_classes=0, checkpoint_path=str(path)
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval().backbone(images), rtol=0, atol=0)
