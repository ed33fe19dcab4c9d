"""Datasets: upload, rejections, deletion, the size cap and an unreachable broker.

Over real HTTP, on the module's API (tests/api/conftest.py); what a worker would write
is written into its database directly (tests/api/helpers.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from swav_service.models import Checkpoint, Dataset, EmbeddingJob, new_id
from tests.api.conftest import assert_error
from tests.api.helpers import (
    add_dataset,
    broker_length,
    create_job,
    dataset_dirs,
    db,
    dispose_engine,
    multipart_body,
    settings_of,
    zip_bytes,
)
from tests.conftest import Service

# --------------------------------------------------------------------------- datasets


def test_upload_is_accepted_and_stored(api: Service, client: httpx.Client) -> None:
    archive = zip_bytes()
    before = broker_length(api, "short")
    response = client.post(
        "/v1/datasets",
        files={"file": ("shapes.zip", archive, "application/zip")},
        data={"name": "my shapes"},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert created["name"] == "my shapes" and created["status"] == "validating"
    assert created["archive_bytes"] == len(archive)
    stored = settings_of(api).dataset_dir(created["id"]) / "upload.zip"
    assert stored.read_bytes() == archive
    assert broker_length(api, "short") == before + 1  # enqueue_ingest sent the task

    fetched = client.get(f"/v1/datasets/{created['id']}")
    assert fetched.status_code == 200 and fetched.json() == created
    listed = client.get("/v1/datasets").json()
    assert listed["data"][0] == created

    # Without `name` the file name's stem is used, whatever the archive type.
    tarball = client.post("/v1/datasets", files={"file": ("my-images.tar.gz", b"\x1f\x8b...")})
    assert tarball.status_code == 202 and tarball.json()["name"] == "my-images"
    assert (settings_of(api).dataset_dir(tarball.json()["id"]) / "upload.tar.gz").exists()


def test_upload_rejections(api: Service, client: httpx.Client) -> None:
    before = dataset_dirs(api)
    marker = b"UPLOADED-BYTES-MARKER"

    response = client.post("/v1/datasets", json={"file": "shapes.zip"})
    assert_error(response, 415, "unsupported_media_type")
    response = client.post("/v1/datasets", data={"name": "x"})  # urlencoded form
    assert_error(response, 415, "unsupported_media_type")

    response = client.post("/v1/datasets", files={"file": ("shapes.rar", zip_bytes(marker))})
    message = assert_error(response, 415, "unsupported_archive", "file")
    assert ".zip" in message and ".tar.gz" in message
    assert marker.decode() not in response.text

    response = client.post("/v1/datasets", files={"file": ("shapes.zip", b"")})
    assert_error(response, 422, "empty_archive", "file")

    boundary = "testboundary"
    body = multipart_body([("name", None, b"only a name")], boundary)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = client.post("/v1/datasets", content=body, headers=headers)
    assert_error(response, 422, "invalid_request", "file")

    truncated = multipart_body([("file", "a.zip", zip_bytes(marker))], boundary)[:-30]
    response = client.post("/v1/datasets", content=truncated, headers=headers)
    assert_error(response, 400, "invalid_multipart")
    assert marker.decode() not in response.text

    assert dataset_dirs(api) == before  # no partial upload left behind


def test_delete_dataset(api: Service, client: httpx.Client) -> None:
    unused = add_dataset(api)
    folder = settings_of(api).dataset_dir(unused)
    (folder / "images").mkdir(parents=True)
    (folder / "upload.zip").write_bytes(b"x")
    assert client.delete(f"/v1/datasets/{unused}").status_code == 204
    assert not folder.exists()
    assert_error(client.get(f"/v1/datasets/{unused}"), 404, "not_found", "dataset_id")
    with db(api) as session:
        assert session.get(Dataset, unused) is None

    validating = add_dataset(api, status="validating")
    response = client.delete(f"/v1/datasets/{validating}")
    assert_error(response, 409, "dataset_in_use", "dataset_id")

    used = add_dataset(api)
    job = create_job(client, used)
    message = assert_error(
        client.delete(f"/v1/datasets/{used}"), 409, "dataset_in_use", "dataset_id"
    )
    assert job["id"] in message and "queued" in message
    client.post(f"/v1/jobs/{job['id']}/cancel")
    # A finished job still refers to it: the files go, the row stays hidden as `deleted`.
    assert client.delete(f"/v1/datasets/{used}").status_code == 204
    assert_error(client.get(f"/v1/datasets/{used}"), 404, "not_found", "dataset_id")
    with db(api) as session:
        assert session.get(Dataset, used).status == "deleted"  # type: ignore[union-attr]
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    response = client.post(f"/v1/jobs/{job['id']}/resume")
    assert_error(response, 409, "dataset_not_ready", "dataset_id")
    response = client.post("/v1/jobs", json={"dataset_id": used, "preset": "cpu-tiny"})
    assert_error(response, 404, "not_found", "dataset_id")


def test_delete_a_dataset_that_embedding_jobs_used(api: Service, client: httpx.Client) -> None:
    """An embedding job refers to the dataset it embedded: a running one keeps it (409), a
    finished one keeps its row hidden as `deleted` (before: a foreign-key error, a 500)."""
    job = create_job(client, add_dataset(api))
    embedded = add_dataset(api)
    checkpoint_id, embedding_id = new_id("ckpt"), new_id("emb")
    with db(api) as session:
        session.add(Checkpoint(id=checkpoint_id, job_id=job["id"], step=1, epoch=0,
                               path="x.pt", size_bytes=1, sha256="0" * 64))
        session.flush()
        session.add(EmbeddingJob(id=embedding_id, tenant="local", job_id=job["id"],
                                 checkpoint_id=checkpoint_id, dataset_id=embedded,
                                 layer="backbone", status="running"))
    message = assert_error(
        client.delete(f"/v1/datasets/{embedded}"), 409, "dataset_in_use", "dataset_id"
    )
    assert embedding_id in message and "running" in message
    with db(api) as session:
        row = session.get(EmbeddingJob, embedding_id)
        assert row is not None
        row.status = "succeeded"
    assert client.delete(f"/v1/datasets/{embedded}").status_code == 204
    assert_error(client.get(f"/v1/datasets/{embedded}"), 404, "not_found", "dataset_id")
    with db(api) as session:
        assert session.get(Dataset, embedded).status == "deleted"  # type: ignore[union-attr]


def test_upload_size_cap(pg_service: Service) -> None:
    pg_service.env["SWAV_MAX_UPLOAD_BYTES"] = "2000"
    pg_service.start_api()
    boundary = "capboundary"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    with pg_service.client() as client:
        # Refused from the Content-Length alone (100 kB > the cap plus multipart framing).
        body = multipart_body([("file", "big.zip", b"z" * 100_000)], boundary)
        message = assert_error(
            client.post("/v1/datasets", content=body, headers=headers),
            413,
            "payload_too_large",
            "file",
        )
        assert "2000 bytes" in message

    def chunked(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    # No Content-Length (chunked): the archive bytes are counted as they stream in.
    for size in (2001, 5_000_000):
        with pg_service.client() as client:
            body = multipart_body([("file", "big.zip", b"z" * size)], boundary)
            response = client.post("/v1/datasets", content=chunked(body), headers=headers)
            assert "content-length" not in response.request.headers
            assert_error(response, 413, "payload_too_large", "file")

    with pg_service.client() as client:
        assert dataset_dirs(pg_service) == set()  # partial files were deleted
        assert client.get("/v1/datasets").json()["data"] == []
        response = client.post("/v1/datasets", files={"file": ("ok.zip", b"k" * 2000)})
        assert response.status_code == 202, response.text  # exactly the cap is allowed
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_broker_down(pg_service: Service) -> None:
    pg_service.env["SWAV_BROKER_URL"] = "redis://127.0.0.1:1/0"  # nothing listens there
    pg_service.start_api()
    with pg_service.client() as client:
        message = assert_error(client.get("/readyz"), 503, "not_ready")
        assert "broker" in message and "database" not in message
        assert "127.0.0.1" not in message and "Error" not in message  # the cause is logged
        response = client.post("/v1/datasets", files={"file": ("a.zip", zip_bytes())})
        assert_error(response, 503, "broker_unavailable")
        (dataset,) = client.get("/v1/datasets").json()["data"]
        assert dataset["status"] == "failed"
        assert dataset["error"]["code"] == "broker_unavailable"

        ready = add_dataset(pg_service)
        response = client.post("/v1/jobs", json={"dataset_id": ready, "preset": "cpu-tiny"})
        assert_error(response, 503, "broker_unavailable")
        (job,) = client.get("/v1/jobs").json()["data"]
        assert job["status"] == "failed" and job["error"]["code"] == "broker_unavailable"
    dispose_engine(pg_service)
