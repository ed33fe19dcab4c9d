"""A timm backbone through the service on its embedded defaults: submit by name (auto
fits the crops to it), train, cancel, resume, embed, and the exports loaded in timm and
onnxruntime."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
from PIL import Image

from tests.conftest import Service
from tests.e2e.test_service_e2e import job_status, upload_ready_dataset, wait_for

BACKBONE = "timm/convnext_atto"
FEATURES = 320  # convnext_atto's last stage width, read by the engine from the model


def png(seed: int, size: int = 40) -> str:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_timm_backbone_trains_resumes_and_serves(
    embedded_service: Service, shapes_dir: Path, tmp_path: Path
) -> None:
    embedded_service.start_api()
    embedded_service.start_worker("short,train")
    with embedded_service.client() as client:
        dataset = upload_ready_dataset(client, embedded_service, shapes_dir)
        created = client.post("/v1/jobs", json={
            "dataset_id": dataset["id"],
            "config": {"backbone": BACKBONE, "epochs": 20, "checkpoint_every_steps": 2},
        })
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["config"]["backbone"] == BACKBONE
        large, small = job["config"]["size_crops"]  # 32 px images: auto's (32, 24) raised
        assert small >= 32 and large > small
        job_id = job["id"]

        wait_for(lambda: job_status(client, job_id)["progress"]["step"] >= 2, 300,
                 "2 steps", embedded_service)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        wait_for(lambda: job_status(client, job_id)["status"] == "cancelled", 120,
                 "cancelled", embedded_service)
        stopped_at = max(c["step"] for c in
                         client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"])
        assert client.post(f"/v1/jobs/{job_id}/resume").status_code == 202
        done = wait_for(lambda: (j := job_status(client, job_id))["status"] in
                        ("succeeded", "failed") and j, 600, "resumed job ended",
                        embedded_service)
        assert done["status"] == "succeeded", done["error"]
        total = done["progress"]["total_steps"]
        assert done["progress"]["step"] == total > stopped_at >= 2
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 200}).json()["data"]
        assert [e["data"]["step"] for e in events if e["type"] == "resumed"] == [stopped_at]

        final = next(c for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
                     if c["final"])
        embedded = client.post("/v1/embeddings", json={
            "model": final["id"], "input": [png(1), png(2, size=90)]})
        assert embedded.status_code == 200, embedded.text
        rows = np.array([r["embedding"] for r in embedded.json()["data"]], dtype=np.float32)
        assert rows.shape == (2, FEATURES)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)

        # A batch embedding job over the dataset, and the checkpoint's quality report.
        batch = client.post(f"/v1/jobs/{job_id}/embeddings", json={})
        assert batch.status_code == 202, batch.text
        result = wait_for(lambda: (b := client.get(f"/v1/embedding-jobs/{batch.json()['id']}")
                                   .json())["status"] in ("succeeded", "failed") and b,
                          120, "embedding job", embedded_service)
        assert result["status"] == "succeeded" and result["num_rows"] == 128, result
        matrix = np.load(io.BytesIO(client.get(
            f"/v1/embedding-jobs/{result['id']}/download", params={"file": "embeddings"}
        ).content))
        assert matrix.shape == (128, FEATURES)
        quality = wait_for(lambda: client.get(f"/v1/checkpoints/{final['id']}").json()
                           ["quality"], 120, "quality report", embedded_service)
        assert 0 <= quality["knn_top1"] <= 1 and quality["n_train"] + quality["n_val"] == 128

        # The exports load in the tools users load them in, and agree with each other.
        assert final["export_formats"] == ["full", "safetensors", "timm", "onnx"]
        files = {}
        for fmt in ("timm", "onnx"):
            download = client.get(f"/v1/checkpoints/{final['id']}/download",
                                  params={"format": fmt})
            assert download.status_code == 200, download.text
            files[fmt] = tmp_path / download.headers["content-disposition"].split('"')[1]
            files[fmt].write_bytes(download.content)
    images = np.random.default_rng(0).standard_normal((3, 3, large, large)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(files["onnx"]),
                                           providers=["CPUExecutionProvider"])
    from_onnx = session.run(["features"], {"images": images})[0]
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=0,
                              checkpoint_path=str(files["timm"])).eval()
    with torch.no_grad():
        from_timm = model(torch.from_numpy(images)).numpy()
    assert from_onnx.shape == from_timm.shape == (3, FEATURES)
    np.testing.assert_allclose(from_onnx, from_timm, atol=1e-4, rtol=0)
