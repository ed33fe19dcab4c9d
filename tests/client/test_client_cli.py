"""`swav_client` and the `swav` command: pure pieces, then the CLI against a live service
(PostgreSQL, Redis, uvicorn and a Celery worker, via tests/conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from swav_client import (
    Checkpoint,
    Dataset,
    Event,
    Job,
    Progress,
    ServerUnreachable,
    SwavClient,
)
from swav_client.session import parse_retry_after
from swav_client.sse import parse_sse
from swav_client.upload import scan_folder, tar_length, tar_pieces, upload_body
from swav_core.synthetic import write_shapes_dataset
from tests.api.test_metrics import own_queues
from tests.conftest import BIN, ROOT, Service, free_port

STEPS = 2  # epochs=2 of 32 images at cpu-tiny's batch 32: one step per epoch


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 images of 32 px (32 images), plus a hidden file the upload leaves out."""
    root = write_shapes_dataset(tmp_path_factory.mktemp("tiny") / "tiny", per_class=8, size=32)
    (root / ".DS_Store").write_bytes(b"finder")
    return root


# --------------------------------------------------------------------------- pure pieces


def test_folder_streams_as_an_exact_tar(tiny_shapes: Path) -> None:
    members = scan_folder(tiny_shapes)
    data = b"".join(tar_pieces(members))
    assert len(data) == tar_length(members)  # the Content-Length sent up front
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
        assert names == sorted(p.relative_to(tiny_shapes).as_posix()
                               for p in tiny_shapes.rglob("*.png"))
        first = archive.extractfile(names[0])
        assert first is not None and first.read() == (tiny_shapes / names[0]).read_bytes()

    body = upload_body(tiny_shapes)
    chunks = list(body.chunks())
    assert sum(map(len, chunks)) == body.length and body.filename == "tiny.tar"
    assert data in b"".join(chunks)


def test_retry_after_and_sse_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: now
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None

    lines = [": keepalive", "", "id: 1", "event: state", "data: {\"a\":", "data: 1}", "",
             "id: 2", "data: x", ""]
    events = list(parse_sse(lines))
    assert [(e.id, e.event, e.data) for e in events] == [
        ("1", "state", '{"a":\n1}'), ("2", "message", "x")]


def test_unreachable_server_is_retried_then_reported() -> None:
    client = SwavClient(f"http://127.0.0.1:{free_port()}", max_retries=1)
    with client, pytest.raises(ServerUnreachable, match="cannot connect"):
        client.get_job("job_0000000000000000")


# --------------------------------------------------------------------------- live service


def swav(service: Service, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `swav` command with the server and key from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAV_")}
    env |= {"SWAV_URL": service.base_url, "COLUMNS": "200"}
    if key is None:
        key = service.ensure_key()
    if key:
        env["SWAV_API_KEY"] = key
    return subprocess.run([str(BIN / "swav"), *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}\n{result.stdout}\n{result.stderr}"
    return result


def test_cli_against_live_service(pg_service: Service, tiny_shapes: Path, tmp_path: Path) -> None:
    train, short = own_queues(pg_service)
    pg_service.start_api()
    pg_service.start_worker(f"{short},{train}")

    # Upload the folder (tar streamed), wait for validation.
    dataset = json.loads(ok(swav(pg_service, "--json", "datasets", "upload",
                                 str(tiny_shapes))).stdout)
    assert dataset["status"] == "ready" and dataset["name"] == "tiny"
    assert dataset["num_images"] == 32 and dataset["num_skipped"] == 0
    assert dataset["classes"] == ["cross", "disk", "square", "stripes"]
    assert dataset["id"] in ok(swav(pg_service, "datasets", "list")).stdout
    found = ok(swav(pg_service, "backbones", "--contains", "efficientnet_b0", "--family",
                    "torchvision")).stdout.split()
    assert found == ["torchvision/efficientnet_b0"]

    # Submit and follow to success: the live bar on stderr, the job on stdout.
    followed = ok(swav(pg_service, "jobs", "submit", "--dataset", dataset["id"], "--preset",
                       "cpu-tiny", "--set", "epochs=2", "--set", "size_crops=32,24", "--name",
                       "cli", "--follow"))
    assert f"step {STEPS}/{STEPS}" in followed.stderr and "succeeded" in followed.stderr
    job_id = followed.stderr.split("submitted ", 1)[1].split()[0]
    job = json.loads(ok(swav(pg_service, "jobs", "show", job_id, "--json")).stdout)
    assert job["status"] == "succeeded" and job["progress"]["step"] == STEPS
    assert job["config"]["epochs"] == 2 and job["name"] == "cli"
    assert job["config"]["size_crops"] == [32, 24]  # sent as a list (tests/core/test_set_parser.py)
    listed = json.loads(ok(swav(pg_service, "--json", "jobs", "list",
                                "--status", "succeeded")).stdout)
    assert [j["id"] for j in listed["data"]] == [job_id]
    logs = ok(swav(pg_service, "jobs", "logs", job_id)).stdout
    assert "state" in logs and f"step={STEPS}" in logs

    # Download the final checkpoint: the bytes the server announced.
    checkpoints = json.loads(ok(swav(pg_service, "--json", "checkpoints", "list",
                                     job_id)).stdout)["data"]
    final = next(c for c in checkpoints if c["final"])
    saved = json.loads(ok(swav(pg_service, "--json", "checkpoints", "download", final["id"],
                               "--out", str(tmp_path))).stdout)
    path = Path(saved["path"])
    assert path.parent == tmp_path and path.suffix == ".pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == final["sha256"]
    assert path.stat().st_size == final["size_bytes"]
    assert final["export_formats"] == ["full", "safetensors", "backbone", "onnx"]
    saved = json.loads(ok(swav(pg_service, "--json", "checkpoints", "download", final["id"],
                               "--format", "onnx", "--out", str(tmp_path))).stdout)
    assert saved["format"] == "onnx" and Path(saved["path"]).suffix == ".onnx"
    session = onnxruntime.InferenceSession(saved["path"], providers=["CPUExecutionProvider"])
    features = session.run(["features"], {"images": np.zeros((3, 3, 32, 32), np.float32)})[0]
    assert features.shape == (3, 64)  # tiny_cnn's 64 features, any batch size
    refused = swav(pg_service, "checkpoints", "download", final["id"], "--format", "timm",
                   "--out", str(tmp_path))
    assert refused.returncode == 1 and "422 invalid_request" in refused.stderr
    assert "use one of full, safetensors, backbone, onnx" in refused.stderr

    # Embed three images to .npy: the same rows the API gives for the same request.
    images = sorted(tiny_shapes.rglob("*.png"))[::11]
    out = tmp_path / "emb.npy"
    summary = json.loads(ok(swav(pg_service, "--json", "embed", "--model", job_id,
                                 *map(str, images), "--out", str(out))).stdout)
    assert summary["model"] == final["id"] and summary["rows"] == len(images)
    matrix = np.load(out)
    assert matrix.dtype == np.float32 and matrix.shape == (len(images), summary["dim"])
    with pg_service.client() as client:
        answer = client.post("/v1/embeddings", json={
            "model": final["id"],
            "input": [base64.b64encode(p.read_bytes()).decode() for p in images]})
        assert answer.status_code == 200, answer.text
        reference = np.array([row["embedding"] for row in answer.json()["data"]], np.float32)
        # The same images in one request of the same size, so the same forward pass; the
        # tolerance is only for the JSON route's float text (float32 round-trips exactly).
        np.testing.assert_allclose(matrix, reference, rtol=0, atol=1e-6)

        # The client's types name only fields the server's schemas have.
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model, name in ((Dataset, "DatasetPublic"), (Job, "JobPublic"), (Event, "EventPublic"),
                        (Checkpoint, "CheckpointPublic"), (Progress, "Progress")):
        assert set(model.model_fields) <= set(schemas[name]["properties"]), name

    # Errors: the server's status, code and message; exit 1.
    missing = swav(pg_service, "jobs", "show", "job_0000000000000000")
    assert missing.returncode == 1 and "404 not_found" in missing.stderr
    bad = swav(pg_service, "--json", "jobs", "submit", "--dataset", dataset["id"],
               "--set", "epochs=0")
    assert bad.returncode == 1 and bad.stdout == ""
    assert json.loads(bad.stderr)["error"]["code"] == "invalid_config"
    assert json.loads(bad.stderr)["error"]["param"] == "config.epochs"
    unauthorized = swav(pg_service, "datasets", "list", key="")
    assert unauthorized.returncode == 1 and "401 unauthorized" in unauthorized.stderr

    # A repeated submission with one Idempotency-Key is one job; following it after a
    # cancel exits non-zero.
    long_job = ["--json", "jobs", "submit", "--dataset", dataset["id"], "--preset",
                "cpu-tiny", "--set", "epochs=500", "--idempotency-key", "cli-test-1",
                "--keep-best-by", "knn_top1", "--max-attempts", "2", "--max-runtime", "600"]
    first = json.loads(ok(swav(pg_service, *long_job)).stdout)
    assert first["keep_best_by"] == "knn_top1" and first["max_attempts"] == 2
    assert first["max_runtime_s"] == 600 and first["resources"] == {"gpus": 1, "nodes": 1}
    assert json.loads(ok(swav(pg_service, *long_job)).stdout)["id"] == first["id"]
    ok(swav(pg_service, "jobs", "cancel", first["id"]))
    followed_cancel = swav(pg_service, "jobs", "logs", first["id"], "--follow")
    assert followed_cancel.returncode == 1 and "cancelled" in followed_cancel.stdout
    with SwavClient(pg_service.base_url, api_key=pg_service.ensure_key()) as client:
        assert client.get_job(first["id"]).status == "cancelled"

    # An archive file is streamed as it is, with the name given.
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_shapes / "disk", arcname="disk")
    uploaded = json.loads(ok(swav(pg_service, "--json", "datasets", "upload", str(archive),
                                  "--name", "disks", "--no-wait")).stdout)
    assert uploaded["name"] == "disks" and uploaded["archive_bytes"] == archive.stat().st_size
