"""The README's main job: the whole service on embedded defaults, driven over HTTP.

Makes an API key with `swav-service create-key` (which migrates the new SQLite file;
authentication stays on, as in any deployment), starts `swav-service up` (SQLite, Celery's
filesystem transport, local artifacts, all under ./var/demo), generates a small image set,
uploads it, submits a cpu-tiny job, follows it to `succeeded` over the live event stream,
lists its checkpoints, downloads the final one (sha256 checked) and embeds a few images
with it. No Redis or PostgreSQL needed.

The terminal shows only the product's own progress; the service's output (uvicorn, the
Celery workers' banners and logs) goes to `service.log` in the data folder, whose path is
printed first, so that it can be read when something goes wrong.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import IO

import httpx

from swav_core.synthetic import write_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def demo_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAV_")}
    env["SWAV_DATA_DIR"] = str(data_dir)
    return env


def create_key(env: dict[str, str]) -> str:
    """A new API key of tenant "demo" (the last line create-key prints); create-key
    migrates the fresh SQLite file itself."""
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "create-key", "--tenant", "demo", "--name", "make demo"],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"swav-service create-key failed:\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def start_service(env: dict[str, str], port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """`swav-service up` in its own process group, its output and its children's in `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", "up", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(base: str, log_path: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service did not become ready; see {log_path}")


def dataset_zip(folder: Path) -> bytes:
    """The images under `folder` as a zip, paths relative to it (class folders kept)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.png")):
            archive.write(path, str(path.relative_to(folder)))
    return buffer.getvalue()


def follow(client: httpx.Client, job_id: str) -> None:
    """Print progress from the job's live event stream until it ends."""
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=None
    ) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            data = event["data"]
            if event["type"] == "metrics":
                print(
                    f"  step {data['step']}/{data['total_steps']}  epoch {data['epoch']}  "
                    f"loss {data['loss']:.4f}  lr {data['lr']:.4f}  "
                    f"{data['images_per_s']:.0f} img/s  ETA {data['eta_s']:.0f}s",
                    flush=True,
                )
            elif event["type"] == "state":
                print(f"  job {data['status']}", flush=True)


def print_embeddings(client: httpx.Client, checkpoint_id: str, images: Path) -> None:
    """Embed the first image of each class with the checkpoint (`POST /v1/embeddings`)
    and print the start of each vector."""
    paths = [sorted(folder.glob("*.png"))[0] for folder in sorted(images.iterdir())]
    response = client.post("/v1/embeddings", json={
        "model": checkpoint_id,
        "input": [base64.b64encode(path.read_bytes()).decode() for path in paths],
    })
    response.raise_for_status()
    answer = response.json()
    print(f"embeddings from {answer['model']} ({answer['dim']} dimensions, L2-normalised):")
    for path, row in zip(paths, answer["data"], strict=True):
        start = ", ".join(f"{value:+.3f}" for value in row["embedding"][:6])
        print(f"  {path.relative_to(images)}: [{start}, ...]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swav-demo")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "var" / "demo")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    shutil.rmtree(args.data_dir, ignore_errors=True)
    args.data_dir.mkdir(parents=True)
    base = f"http://127.0.0.1:{args.port}"
    log_path = args.data_dir / "service.log"
    print(f"service logs (API, Celery workers): {log_path}", flush=True)

    env = demo_env(args.data_dir)
    key = create_key(env)
    print(f"API key for tenant demo: {key[:13]}... (sent as Authorization: Bearer)")
    with log_path.open("ab") as log:
        service = start_service(env, args.port, log)
    try:
        wait_ready(base, log_path)
        print(f"service up at {base} (embedded mode, data in {args.data_dir})", flush=True)
        images = write_shapes_dataset(args.data_dir / "images", per_class=32, size=32)
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, timeout=60, headers=headers) as client:
            archive = dataset_zip(images)
            upload = client.post(
                "/v1/datasets",
                data={"name": "shapes"},
                files={"file": ("shapes.zip", archive, "application/zip")},
            )
            upload.raise_for_status()
            dataset_id = upload.json()["id"]
            print(f"dataset {dataset_id} uploaded ({len(archive)} bytes), validating", flush=True)
            while (dataset := client.get(f"/v1/datasets/{dataset_id}").json())["status"] == (
                "validating"
            ):
                time.sleep(0.5)
            if dataset["status"] != "ready":
                raise SystemExit(f"dataset failed: {dataset}; see {log_path}")
            print(
                f"dataset {dataset_id} ready: {dataset['num_images']} images, "
                f"classes {dataset['classes']}",
                flush=True,
            )

            job = client.post(
                "/v1/jobs", json={"dataset_id": dataset_id, "preset": "cpu-tiny", "name": "demo"}
            ).json()
            print(f"job {job['id']} submitted (cpu-tiny)", flush=True)
            follow(client, job["id"])
            job = client.get(f"/v1/jobs/{job['id']}").json()
            if job["status"] != "succeeded":
                raise SystemExit(f"job ended {job['status']}: {job['error']}; see {log_path}")

            checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
            for c in checkpoints:
                print(
                    f"  checkpoint {c['id']} step {c['step']} final={c['final']} "
                    f"{c['size_bytes']} bytes sha256 {c['sha256'][:12]}"
                )
            final = next(c for c in checkpoints if c["final"])
            target = args.data_dir / "final.safetensors"
            response = client.get(
                f"/v1/checkpoints/{final['id']}/download", params={"format": "full"}
            )
            response.raise_for_status()
            if hashlib.sha256(response.content).hexdigest() != final["sha256"]:
                raise SystemExit("downloaded checkpoint does not match its sha256")
            (args.data_dir / "final.pt").write_bytes(response.content)
            model = client.get(
                f"/v1/checkpoints/{final['id']}/download", params={"format": "safetensors"}
            )
            model.raise_for_status()
            target.write_bytes(model.content)
            print(f"downloaded {args.data_dir / 'final.pt'} (sha256 verified) and {target}")
            print_embeddings(client, final["id"], images)
    finally:
        os.killpg(service.pid, signal.SIGINT)
        service.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
