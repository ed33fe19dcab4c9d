"""The dashboard in headless Chromium, and the explorer's API, against a live service.

PostgreSQL + Redis, a live uvicorn and one Celery worker (train and short queues), a
64-image shapes dataset and one cpu-tiny job, shared by the module's tests. The browser
is Debian's `chromium` driven through Debian's `chromium-driver` (.ci/run installs both;
nothing is downloaded at test time). Screenshots go to the test's tmp folder and to
`test-artifacts/` (or $SWAV_TEST_ARTIFACTS). README's docs/job-page.png comes from a real
MNIST run instead (bench/dashboard_picture.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from swav_core.synthetic import write_shapes_dataset
from tests.conftest import (
    REDIS_URL,
    ROOT,
    Service,
    create_database,
    drop_database,
    migrate,
    service_env,
)
from tests.e2e.test_service_e2e import upload_ready_dataset, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("SWAV_TEST_ARTIFACTS", ROOT / "test-artifacts"))
PER_CLASS = 16  # 4 classes x 16 = 64 images of 32 px: 2 steps per epoch at batch 32
EPOCHS = 12  # 24 steps: long enough to be seen running, a minute or less on two cores
NEIGHBOURS = 12  # what the page asks for


@dataclass
class Deployment:
    service: Service
    shapes: Path
    dataset_id: str
    job_id: str
    downloads: Path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A fresh database and Redis db, the API and one worker, a ready dataset, and a job
    just submitted (the browser test watches it run)."""
    root = tmp_path_factory.mktemp("dashboard")
    data = root / "data"
    data.mkdir()
    url = create_database()
    redis_db = 1 + int(secrets.token_hex(1), 16) % 14
    import redis

    redis.Redis.from_url(f"{REDIS_URL}/{redis_db}").flushdb()
    env = service_env(data, url, f"{REDIS_URL}/{redis_db}")
    env["SWAV_EMBED_TORCH_THREADS"] = "1"  # two shared cores
    service = Service(env, data)
    try:
        migrate(env)
        service.start_api()
        service.start_worker("short,train")
        shapes = write_shapes_dataset(root / "shapes", per_class=PER_CLASS, size=32)
        with service.client() as client:
            dataset = upload_ready_dataset(client, service, shapes)
            created = client.post("/v1/jobs", json={
                "dataset_id": dataset["id"], "preset": "cpu-tiny", "name": "shapes-dashboard",
                "config": {"epochs": EPOCHS}})
            assert created.status_code == 201, created.text
        yield Deployment(service, shapes, dataset["id"], created.json()["id"], root / "downloads")
    finally:
        service.stop()
        drop_database(url)


@pytest.fixture(scope="module")
def browser(deployment: Deployment) -> Iterator[WebDriver]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the dashboard tests need Debian's chromium and chromium-driver: "
        "apt-get install -y chromium chromium-driver (.ci/run does)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    deployment.downloads.mkdir()
    options.add_experimental_option("prefs", {
        "download.default_directory": str(deployment.downloads),
        "download.prompt_for_download": False,
    })
    driver = webdriver.Chrome(service=ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: WebDriver, tmp_path: Path, name: str, full_page: bool = False) -> Path:
    """Save a PNG under tmp_path and copy it to ARTIFACTS; full_page: the whole height."""
    size = driver.get_window_size()
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], max(size["height"], int(height) + 140))
        time.sleep(0.3)  # let the layout settle at the new size
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    if full_page:
        driver.set_window_size(size["width"], size["height"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / name)
    return path


def until(driver: WebDriver, check: Callable[[WebDriver], Any], timeout: float, what: str,
          service: Service) -> Any:
    """check(driver) once it is truthy; on timeout, fail with the page's text, the browser
    console and the service logs (and a screenshot `failure.png` in ARTIFACTS)."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(NoSuchElementException,
                                             StaleElementReferenceException))
    try:
        return wait.until(check)
    except TimeoutException as exc:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "failure.png"))
        page = driver.execute_script("return document.body.innerText")
        logs = "\n".join(str(e) for e in driver.get_log("browser"))
        raise AssertionError(f"timed out waiting for {what}\npage:\n{page}\nbrowser console:"
                             f"\n{logs}\n{service.logs()}") from exc


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 200})
        assert page.status_code == 200, page.text
        events += page.json()["data"]
        if page.json()["next_cursor"] is None:
            return events
        after = int(page.json()["next_cursor"])


def wait_succeeded(client: httpx.Client, deployment: Deployment) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body = client.get(f"/v1/jobs/{deployment.job_id}").json()
        assert body["status"] not in ("failed", "cancelled"), body
        return body if body["status"] == "succeeded" else None

    return wait_for(finished, 600, "the job to succeed", deployment.service)


def wait_quality(client: httpx.Client, deployment: Deployment) -> list[dict[str, Any]]:
    """The job's checkpoints once every one on disk has its quality report."""
    def evaluated() -> list[dict[str, Any]] | None:
        rows = client.get(f"/v1/jobs/{deployment.job_id}/checkpoints").json()["data"]
        return rows if rows and all(r["quality"] for r in rows) else None

    return wait_for(evaluated, 300, "quality reports", deployment.service)


def wait_map(client: httpx.Client, deployment: Deployment) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        response = client.get(f"/v1/jobs/{deployment.job_id}/map")
        assert response.status_code in (200, 202), response.text
        return response.json() if response.status_code == 200 else None

    return wait_for(ready, 300, "the dataset map", deployment.service)


def texts(driver: WebDriver, selector: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, selector)]


# --------------------------------------------------------------------------- the browser


def test_dashboard_in_headless_chromium(
    deployment: Deployment, browser: WebDriver, tmp_path: Path
) -> None:
    service, job_id = deployment.service, deployment.job_id
    driver = browser

    # Sign in: a wrong key is refused on the page, the real one opens the jobs list.
    driver.get(f"{service.base_url}/")
    key_field = until(driver, lambda d: d.find_element(By.ID, "api-key").is_displayed()
                      and d.find_element(By.ID, "api-key"), 30, "the sign-in form", service)
    key_field.send_keys("swav_" + "x" * 43)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    refused = until(driver, lambda d: d.find_element(By.ID, "login-error").text, 30,
                    "the refusal", service)
    assert "refused" in refused
    assert key_field.get_attribute("value") == ""  # a refused key is not kept
    key_field.send_keys(service.ensure_key())
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    until(driver, lambda d: d.find_elements(By.ID, "jobs-table"), 30, "the jobs list", service)
    assert not driver.find_element(By.ID, "login").is_displayed()

    # The list shows the job running, then (live, no reload) succeeded.
    status = f'tr[data-job-id="{job_id}"] .status'

    def job_status(d: WebDriver) -> str:
        found = d.find_elements(By.CSS_SELECTOR, status)
        return found[0].get_attribute("data-status") if found else ""

    driver.execute_script("window.notReloaded = true")
    until(driver, lambda d: job_status(d) == "running", 240, "the job running in the list",
          service)
    assert texts(driver, f'tr[data-job-id="{job_id}"] td')[1] == "shapes-dashboard"
    loss_cell = f'tr[data-job-id="{job_id}"] td:nth-child(6)'
    until(driver, lambda d: job_status(d) == "succeeded" or texts(d, loss_cell)[0] != "–", 240,
          "the first metrics in the list", service)
    screenshot(driver, tmp_path, "jobs-list.png")
    until(driver, lambda d: job_status(d) == "succeeded", 600, "the job succeeded", service)
    assert driver.execute_script("return window.notReloaded") is True  # updated in place

    # The job page: one loss-curve vertex per metric event of the job.
    with service.client() as client:
        events = all_events(client, job_id)
        checkpoints = wait_quality(client, deployment)
    metric_events = [e for e in events if e["type"] == "metrics"]
    assert len(metric_events) >= 2
    driver.find_element(By.CSS_SELECTOR, f'a[href="#/jobs/{job_id}"]').click()

    def vertices(chart: str) -> int:
        found = driver.find_elements(By.CSS_SELECTOR, f"#chart-{chart} polyline.line")
        return int(found[0].get_attribute("data-count") or 0) if found else -1

    until(driver, lambda d: vertices("loss") == len(metric_events), 60, "the loss curve",
          service)
    points = driver.find_element(By.CSS_SELECTOR, "#chart-loss polyline.line")
    assert len((points.get_attribute("points") or "").split()) == len(metric_events)
    for chart in ("lr", "images_per_s", "code_entropy", "prototype_usage", "loss_over_ln_k"):
        assert vertices(chart) == len(metric_events), chart

    # Checkpoints with their quality and download links; a download works with the key.
    # (Read in one script: the table is redrawn every few seconds.)
    def checkpoint_rows(d: WebDriver) -> list[dict[str, Any]]:
        rows = d.execute_script("""
            return [...document.querySelectorAll("#checkpoints-table tr[data-checkpoint-id]")]
              .map((row) => ({id: row.dataset.checkpointId,
                              knn: row.querySelector("td.knn").textContent,
                              links: [...row.querySelectorAll("a.download")]
                                .map((a) => a.getAttribute("href"))}));""")
        shown = [r for r in rows if "%" in r["knn"]]
        return rows if len(shown) == len(checkpoints) == len(rows) else []

    rows = until(driver, checkpoint_rows, 60, "the checkpoints with quality", service)
    by_id = {c["id"]: c for c in checkpoints}
    for row in rows:
        checkpoint = by_id[row["id"]]
        assert row["knn"] == f"{100 * checkpoint['quality']['knn_top1']:.1f} %"
        assert row["links"] == [
            f"/v1/checkpoints/{checkpoint['id']}/download?format={fmt}"
            for fmt in ("full", "safetensors", "backbone", "onnx")  # its export_formats
        ]
    final = next(c for c in checkpoints if c["final"])
    driver.find_element(
        By.CSS_SELECTOR, f'tr[data-checkpoint-id="{final["id"]}"] a.download').click()
    saved = wait_for(lambda: [p for p in deployment.downloads.glob("*.pt")], 60,
                     "the checkpoint download", service)
    assert hashlib.sha256(saved[0].read_bytes()).hexdigest() == final["sha256"]
    screenshot(driver, tmp_path, "job-page.png", full_page=True)

    # The explorer: the map of all 64 images, then neighbours of a chosen and a dropped image.
    driver.find_element(By.ID, "explore-link").click()
    until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#map circle.point")) == 64,
          300, "the dataset map", service)
    chosen = deployment.shapes / "disk" / "disk_0003.png"
    driver.find_element(By.ID, "explorer-file").send_keys(str(chosen))

    def neighbours(d: WebDriver) -> list[tuple[str, float]]:
        found = d.execute_script("""
            return [...document.querySelectorAll("#neighbours .neighbour")]
              .map((f) => [f.dataset.path, Number(f.dataset.score)]);""")
        return [(path, score) for path, score in found]

    shown = until(driver, lambda d: len(neighbours(d)) == NEIGHBOURS and neighbours(d), 120,
                  "neighbours of the chosen image", service)
    assert shown[0][0] == "disk/disk_0003.png"
    # The same image through the same model and preprocessing as the index: the cosine
    # differs from 1 only by float32 rounding (batch sizes differ between the two passes).
    assert shown[0][1] > 0.9999
    assert [s for _, s in shown] == sorted((s for _, s in shown), reverse=True)
    until(driver, lambda d: d.execute_script("""
        const images = [...document.querySelectorAll(".neighbour img")];
        return images.length > 0 && images.every((img) => img.naturalWidth > 0);"""),
          60, "the thumbnails", service)

    dropped = deployment.shapes / "square" / "square_0005.png"
    driver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "square_0005.png", {type: "image/png"}));
        const zone = document.getElementById("dropzone");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true,
                                                      cancelable: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true,
                                                  cancelable: true}));
        """,
        base64.b64encode(dropped.read_bytes()).decode(),
    )
    shown = until(driver, lambda d: (n := neighbours(d)) and n[0][0] == "square/square_0005.png"
                  and n, 120, "neighbours of the dropped image", service)
    assert shown[0][1] > 0.9999 and len(shown) == NEIGHBOURS
    assert len(driver.find_elements(By.CSS_SELECTOR, "#map .overlay circle.ring")) == NEIGHBOURS
    time.sleep(0.5)  # the thumbnails' blobs
    screenshot(driver, tmp_path, "explorer.png", full_page=True)
    console = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"
               and "401" not in e.get("message", "")]  # the refused key, on purpose
    assert console == [], console


# --------------------------------------------------------------------------- the API


def test_explorer_api_matches_oracles_and_is_scoped(deployment: Deployment) -> None:
    """The map is the PCA of the embedding job's matrix and the neighbours its cosine top-k
    (numpy oracles); another tenant sees 404; thumbnails never leave the images folder."""
    service, job_id = deployment.service, deployment.job_id
    with service.client() as client:
        wait_succeeded(client, deployment)
        body = wait_map(client, deployment)
        assert body["status"] == "ready" and body["num_images"] == len(body["points"]) == 64
        matrix = np.load(io.BytesIO(client.get(
            f"/v1/embedding-jobs/{body['embedding_job_id']}/download",
            params={"file": "embeddings"}).content))
        index = client.get(f"/v1/embedding-jobs/{body['embedding_job_id']}/download",
                           params={"file": "index"}).json()
        points = body["points"]
        assert [p["path"] for p in points] == index
        assert [p["label"] for p in points] == [path.split("/")[0] for path in index]

        # PCA oracle: an exact SVD of the centred matrix; axes agree up to sign.
        centred = matrix.astype(np.float64) - matrix.mean(axis=0)
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        oracle = centred @ vt[:2].T  # (64, 2)
        coords = np.array([[p["x"], p["y"]] for p in points])
        signs = np.sign((coords * oracle).sum(axis=0))
        # float32 inputs and a randomised solver with 4 power iterations on a 64-row
        # matrix (exact up to rounding when q covers the spectrum's top): 1e-3 of the spread.
        assert np.allclose(coords, oracle * signs, atol=1e-3 * np.abs(oracle).max())
        explained = singular[:2] ** 2 / (singular**2).sum()
        assert np.allclose(body["explained_variance"], explained, atol=1e-3)

        # Neighbour oracle: cosine of the image's /v1/embeddings vector with every row.
        image = (deployment.shapes / "cross" / "cross_0002.png").read_bytes()
        answer = client.post(f"/v1/jobs/{job_id}/neighbours", params={"k": 5},
                             files={"file": ("cross.png", image, "image/png")})
        assert answer.status_code == 200, answer.text
        found = answer.json()
        assert found["checkpoint_id"] == body["checkpoint_id"]
        vector = np.array(client.post("/v1/embeddings", json={
            "model": body["checkpoint_id"], "input": [base64.b64encode(image).decode()],
            "layer": "backbone", "normalize": True}).json()["data"][0]["embedding"])
        scores = matrix @ vector
        top = np.argsort(-scores, kind="stable")[:5]
        assert [n["path"] for n in found["data"]] == [index[i] for i in top]
        assert found["data"][0]["path"] == "cross/cross_0002.png"
        assert np.allclose([n["score"] for n in found["data"]], scores[top], atol=1e-5)
        query = (vector - matrix.mean(axis=0)) @ vt[:2].T * signs
        assert np.allclose(found["query"], query, atol=1e-3 * np.abs(oracle).max())

        # A thumbnail: the image itself (32 px is under the 160 px bound), as PNG.
        thumbnail = client.get(found["data"][0]["thumbnail_url"])
        assert thumbnail.status_code == 200
        assert thumbnail.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(thumbnail.content)) as shown:
            assert shown.size == (32, 32)

        check_refusals(client, deployment, image)

    # Another tenant: every explorer route answers 404 for this job, as if it did not exist.
    missing = {"error": {"code": "not_found", "message": f"no job with id {job_id!r}",
                         "param": "job_id"}}
    with service.client(key=service.other_tenant_key()) as other:
        for response in (
            other.get(f"/v1/jobs/{job_id}/map"),
            other.post(f"/v1/jobs/{job_id}/neighbours",
                       files={"file": ("cross.png", image, "image/png")}),
            other.get(f"/v1/jobs/{job_id}/images/cross/cross_0002.png"),
        ):
            assert response.status_code == 404 and response.json() == missing
    unauthenticated = httpx.get(f"{service.base_url}/v1/jobs/{job_id}/map")
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["code"] == "unauthorized"


def check_refusals(client: httpx.Client, deployment: Deployment, image: bytes) -> None:
    """Thumbnails serve only images inside the dataset's images folder; bad uploads are 4xx."""
    job_id = deployment.job_id
    images = deployment.service.data_dir / "artifacts" / "datasets" / deployment.dataset_id / \
        "images"
    assert (images / "cross" / "cross_0002.png").is_file()
    outside = deployment.service.data_dir / "outside.png"
    outside.write_bytes(image)
    (images / "link.png").symlink_to(outside)
    (images / "notes.png").write_text("not an image")
    for path in ("%2e%2e/%2e%2e/%2e%2e/%2e%2e/outside.png",  # the data dir, 4 levels up
                 "..%2F..%2F..%2F..%2Foutside.png",
                 str(outside).lstrip("/").replace("/", "%2F").join(["%2F", ""]),  # absolute
                 "link.png", "notes.png", "cross", "", "missing.png"):
        response = client.get(f"/v1/jobs/{job_id}/images/{path}")
        assert response.status_code == 404, (path, response.text)
        error = response.json()["error"]
        assert error["code"] == "not_found" and error["param"] == "path", (path, error)

    neighbours = f"/v1/jobs/{job_id}/neighbours"
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({"files": {"file": ("notes.png", b"not an image", "image/png")}}, 400,
         "invalid_image", "file.0"),
        ({"files": {"picture": ("cross.png", image, "image/png")}}, 422,
         "invalid_request", "file"),
        ({"json": {"file": base64.b64encode(image).decode()}}, 415,
         "unsupported_media_type", None),
        ({"files": {"file": ("cross.png", image, "image/png")}, "params": {"k": 0}}, 422,
         "invalid_request", "k"),
    ]
    for kwargs, status, code, param in cases:
        response = client.post(neighbours, **kwargs)
        assert response.status_code == status, (kwargs.keys(), response.text)
        assert response.json()["error"]["code"] == code
        assert response.json()["error"]["param"] == param
    unknown = client.get(f"/v1/jobs/{job_id}/map", params={"checkpoint_id": "ckpt_0"})
    assert unknown.status_code == 404
    assert json.loads(unknown.text)["error"]["param"] == "checkpoint_id"
