"""A dataset's prepared copy over the real service: the ingesting worker writes it for a new
dataset (counted in the tenant's stored bytes), and `swav-service prepare-datasets`
writes it for a ready dataset from before it existed."""

from __future__ import annotations

import io
import secrets
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from swav_core.image_folder import scan_image_folder
from swav_core.images import load_rgb
from swav_core.prepared import PreparedImages, capped_rgb, is_prepared
from swav_service.layout import dataset_images_dir, dataset_prepared_dir
from swav_service.models import Dataset
from swav_service.quota import folder_bytes
from tests.api.helpers import db, dispose_engine, settings_of
from tests.conftest import Service, create_database, drop_database, migrate, service_env

CAP = 20
SIZES = [(40, 30), (16, 50), (12, 12), (64, 20)]  # (width, height): above and below the cap


def archive() -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for i, (width, height) in enumerate(SIZES):
            image = io.BytesIO()
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(image, "PNG")
            zipped.writestr(f"set/{'ab'[i % 2]}/{i}.png", image.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API + a short-queue worker (a queue of its own: other sessions share this Redis)."""
    data_dir = tmp_path_factory.mktemp("prepared") / "data"
    data_dir.mkdir()
    url = create_database()
    redis_db = 1 + int(secrets.token_hex(1), 16) % 14
    env = service_env(data_dir, url, f"redis://127.0.0.1:6379/{redis_db}")
    env["SWAV_PREPARED_MAX_SHORT_SIDE"] = str(CAP)
    env["SWAV_SHORT_QUEUE"] = f"short-prepared-{secrets.token_hex(4)}"
    service = Service(env, data_dir)
    try:
        migrate(env)
        service.start_api()
        service.start_worker("short")
        yield service
    finally:
        service.stop()
        dispose_engine(service)
        drop_database(url)


def ingest(service: Service) -> dict[str, Any]:
    with service.client() as client:
        response = client.post("/v1/datasets", files={"file": ("set.zip", archive(), "x")})
        assert response.status_code == 202, response.text
        dataset_id = response.json()["id"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            body: dict[str, Any] = client.get(f"/v1/datasets/{dataset_id}").json()
            if body["status"] != "validating":
                assert body["status"] == "ready", body
                return body
            time.sleep(0.2)
    raise AssertionError(f"dataset {dataset_id} still validating\n{service.logs()}")


def assert_prepared_as_the_images(service: Service, dataset_id: str) -> None:
    """The prepared copy is complete, in scan order, each image load_rgb's capped."""
    settings = settings_of(service)
    images = dataset_images_dir(settings, dataset_id)
    scan = scan_image_folder(images)
    prepared = PreparedImages(dataset_prepared_dir(settings, dataset_id))
    assert prepared.manifest.fingerprint == scan.fingerprint()
    assert prepared.manifest.max_short_side == CAP
    assert len(prepared) == len(scan.files) == len(SIZES)
    for i, name in enumerate(scan.files):
        assert np.array_equal(prepared[i], capped_rgb(load_rgb(images / name), CAP)), name
        assert min(prepared[i].shape[1:]) <= CAP


def stored_images_bytes(service: Service, dataset_id: str) -> int:
    with service.client() as client:
        usage = client.get("/v1/usage").json()
    with db(service) as session:
        rows = session.scalars(select(Dataset).where(Dataset.tenant == "local")).all()
    assert usage["images_bytes"] == sum(row.images_bytes for row in rows)  # what usage reports
    return next(row.images_bytes for row in rows if row.id == dataset_id)


def test_ingestion_prepares_a_new_dataset(service: Service) -> None:
    dataset_id = ingest(service)["id"]
    assert_prepared_as_the_images(service, dataset_id)
    settings = settings_of(service)
    images = folder_bytes(dataset_images_dir(settings, dataset_id))
    prepared = folder_bytes(dataset_prepared_dir(settings, dataset_id))
    assert stored_images_bytes(service, dataset_id) == images + prepared


def test_the_cli_prepares_an_older_dataset(service: Service) -> None:
    dataset_id = ingest(service)["id"]
    settings = settings_of(service)
    folder = dataset_prepared_dir(settings, dataset_id)
    images = folder_bytes(dataset_images_dir(settings, dataset_id))
    for path in folder.iterdir():  # as ingested before prepared copies existed
        path.unlink()
    folder.rmdir()
    with db(service) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        row.images_bytes = images

    result = service.cli("prepare-datasets")
    assert result.returncode == 0, result.stderr
    assert f"{dataset_id}: prepared" in result.stdout.splitlines()
    assert is_prepared(folder)
    assert_prepared_as_the_images(service, dataset_id)
    assert stored_images_bytes(service, dataset_id) == images + folder_bytes(folder)

    again = service.cli("prepare-datasets")  # nothing to do: every ready dataset has its copy
    assert again.returncode == 0, again.stderr
    assert set(again.stdout.splitlines()) >= {f"{dataset_id}: already prepared"}
    assert "prepared" not in {line.split(": ")[-1] for line in again.stdout.splitlines()}
