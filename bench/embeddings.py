"""POST /v1/embeddings throughput: serving overhead at batch 32, and micro-batching's gain.

Makes a temporary embedded-mode data dir (SQLite, `swav-service migrate`), saves a random
resnet18 SwAV checkpoint configured for 96 px crops and inserts its dataset/job/checkpoint
rows, then starts `swav-service api` (a subprocess) and measures:

1. Serving overhead: sequential requests of 32 base64 JPEGs against the bare forward
   (`embed` on the same checkpoint, preprocessed batch of 32) in this process. Both
   processes use --threads torch threads, and never run at the same time (they alternate,
   --rounds times; the median ratio is reported). Responses as numbers and as base64.
   Goal: endpoint images/s >= 0.8 x bare images/s.
2. Micro-batching: --clients concurrent clients each sending single-image requests for
   --seconds, with batching on (default settings) and off (a fresh API with
   SWAV_EMBED_BATCH_WINDOW_MS=0 and SWAV_EMBED_MAX_BATCH=1): requests/s, p50/p99.
   Goal: on/off >= 3x. The bare forward's images/s at batch 32 over batch 1 is printed
   too: on a CPU it bounds what batching can gain (on a GPU, batch 1 is launch-bound).

    .venv/bin/python bench/embeddings.py [--threads 2] [--seconds 12] [--clients 32]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from sqlalchemy.orm import Session

from swav_core.checkpoint import save_checkpoint
from swav_core.embed import embed, preprocess
from swav_core.exports import load_model
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_service.db import make_engine
from swav_service.models import Checkpoint, Dataset, Job, new_id

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """Distinct 128 x 112 JPEGs (smooth gradients plus noise, like photos more than noise)."""
    rng = np.random.default_rng(seed)
    out = []
    y, x = np.mgrid[0:112, 0:128]
    for _ in range(count):
        base = rng.uniform(0, 255, 3) + rng.uniform(-1, 1, 3) * (x[..., None] + y[..., None])
        pixels = np.clip(base + rng.normal(0, 20, (112, 128, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def setup(data_dir: Path, env: dict[str, str]) -> tuple[str, Path]:
    """Migrate, save the resnet18 checkpoint, insert its rows; (checkpoint id, its path)."""
    subprocess.run([str(BIN / "swav-service"), "migrate"], env=env, check=True, cwd=ROOT)
    config = config_from(
        None,
        backbone="resnet18",
        size_crops=(96, 64),
        n_crops=(2, 2),
        n_prototypes=100,
        hidden_mlp=512,
    )
    torch.manual_seed(0)
    model = SwAVModel.from_config(config)
    state = {"model": model.state_dict(), "config": config.model_dump(mode="json")}
    artifacts = (data_dir / "artifacts").resolve()
    job_id, checkpoint_id = new_id("job"), new_id("ckpt")
    info = save_checkpoint(artifacts / "jobs" / job_id / "run", state, step=1, keep_last=1,
                           final=True)
    assert info.sha256 is not None and info.size is not None
    engine = make_engine(f"sqlite:///{(data_dir / 'swav.db').resolve()}")
    with Session(engine) as session:
        session.add(Dataset(id="ds_bench", tenant="local", name="bench", status="ready"))
        session.flush()
        session.add(Job(id=job_id, tenant="local", dataset_id="ds_bench", status="succeeded",
                        config=config.model_dump(mode="json"), epochs=1))
        session.flush()
        session.add(Checkpoint(id=checkpoint_id, job_id=job_id, step=1, epoch=1, final=True,
                               path=str(info.path.relative_to(artifacts)), size_bytes=info.size,
                               sha256=info.sha256))
        session.commit()
    engine.dispose()
    return checkpoint_id, info.path


class Api:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.base = f"http://127.0.0.1:{free_port()}"
        self._log = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [str(BIN / "swav-service"), "api", "--port", self.base.rsplit(":", 1)[1]],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"API did not start; see {log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        self._log.close()


def post(http: httpx.Client, model: str, inputs: list[str], **extra: Any) -> dict[str, Any]:
    response = http.post("/v1/embeddings", json={"model": model, "input": inputs, **extra})
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text}")
    return dict(response.json())


class Bare:
    """The same checkpoint's model in this process, on a preprocessed batch of 32."""

    def __init__(self, path: Path, images: list[bytes]) -> None:
        self.model, config = load_model(path)
        pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        self.batch = preprocess(pil, config.size_crops[0])
        self.output = embed(self.model, self.batch)

    def rate(self, iterations: int, batch_size: int = BATCH) -> float:
        batch = self.batch[:batch_size]
        start = time.perf_counter()
        for _ in range(iterations):
            embed(self.model, batch)
        return iterations * len(batch) / (time.perf_counter() - start)


def endpoint_rate(
    http: httpx.Client, model: str, inputs: list[str], iterations: int, encoding: str
) -> tuple[float, float]:
    """(images/s of sequential requests, share of that time the server spent in forwards)."""
    before = http.get("/v1/embeddings/stats").json()["forward_s"]
    start = time.perf_counter()
    for _ in range(iterations):
        post(http, model, inputs, encoding_format=encoding)
    elapsed = time.perf_counter() - start
    forward = http.get("/v1/embeddings/stats").json()["forward_s"] - before
    return iterations * len(inputs) / elapsed, forward / elapsed


def serving_overhead(
    base: str, model: str, inputs: list[str], bare: Bare, rounds: int, iterations: int
) -> None:
    """Bare and endpoint measured in alternation, `rounds` times; median ratios printed.

    Alternating makes the ratio robust to other load on the machine that comes and goes.
    """
    with httpx.Client(base_url=base, timeout=120) as http:
        body = post(http, model, inputs)
        post(http, model, inputs, encoding_format="base64")
        got = torch.tensor([row["embedding"] for row in body["data"]])
        error = (got - bare.output).abs().max().item()
        bare.rate(1)
        results: dict[str, list[float]] = {"bare": [], "float": [], "base64": [], "share": []}
        for _ in range(rounds):
            results["bare"].append(bare.rate(iterations))
            for encoding in ("float", "base64"):
                rate, share = endpoint_rate(http, model, inputs, iterations, encoding)
                results[encoding].append(rate)
                results["share"].append(share)
    median = statistics.median
    bare_rate = median(results["bare"])
    print(f"serving overhead at batch {BATCH} (sequential requests, median of {rounds} "
          f"alternating rounds):")
    print(f"  bare forward        {bare_rate:7.1f} images/s")
    for encoding in ("float", "base64"):
        ratios = [e / b for e, b in zip(results[encoding], results["bare"], strict=True)]
        print(f"  endpoint ({encoding:6s})   {median(results[encoding]):7.1f} images/s; ratio "
              f"{median(ratios):.2f} (goal >= 0.8)")
    print(f"  server time in the forward: {median(results['share']):.0%} of request time; "
          f"max |endpoint - bare| {error:.1e}")


def concurrent_singles(
    base: str, model: str, inputs: list[str], clients: int, seconds: float
) -> tuple[float, list[float], int, dict[str, Any]]:
    """(requests/s, latencies, errors, stats delta) of `clients` single-image loops."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    with httpx.Client(base_url=base, timeout=120) as http:
        for i in range(0, len(inputs), 8):  # warm-up (and model load)
            post(http, model, inputs[i : i + 1])
        before = http.get("/v1/embeddings/stats").json()
    start_at = time.monotonic() + 0.5
    stop_at = start_at + seconds

    def client(index: int) -> None:
        nonlocal errors
        mine: list[float] = []
        bad = 0
        with httpx.Client(base_url=base, timeout=120) as http:
            http.get("/healthz")  # connect before the clock starts
            time.sleep(max(0.0, start_at - time.monotonic()))
            n = index
            while time.monotonic() < stop_at:
                begin = time.perf_counter()
                try:
                    post(http, model, [inputs[n % len(inputs)]])
                except (httpx.HTTPError, RuntimeError):
                    bad += 1
                mine.append(time.perf_counter() - begin)
                n += clients
        with lock:
            latencies.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start_at
    with httpx.Client(base_url=base, timeout=30) as http:
        after = http.get("/v1/embeddings/stats").json()
    delta = {k: after[k] - before[k] for k in ("model_calls", "items", "requests")}
    return len(latencies) / elapsed, latencies, errors, delta


def describe(name: str, rate: float, latencies: list[float], errors: int,
             delta: dict[str, Any]) -> str:
    q = statistics.quantiles(latencies, n=100)
    per_call = delta["items"] / max(1, delta["model_calls"])
    return (f"  {name}: {rate:7.1f} req/s, p50 {q[49] * 1000:6.1f} ms, p99 {q[98] * 1000:6.1f} ms, "
            f"errors {errors} of {len(latencies)}; {delta['model_calls']} forwards, "
            f"{per_call:.1f} images/forward")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data_dir = Path(tempfile.mkdtemp(prefix="swav-embed-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWAV_")}
    env |= {"SWAV_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT),
            "SWAV_EMBED_TORCH_THREADS": str(args.threads),
            # serving throughput is measured, not API keys or the per-tenant request rate
            "SWAV_AUTH_ENABLED": "false", "SWAV_TENANT_EMBED_RATE_PER_S": "0"}
    try:
        began = time.monotonic()
        model, path = setup(data_dir, env)
        images = make_images(BATCH)
        inputs = [base64.b64encode(data).decode() for data in images]
        print(f"resnet18 @ 96 px, batch {BATCH}, {args.threads} torch threads in both processes, "
              f"{os.cpu_count()} CPUs, device cpu")

        bare = Bare(path, images)
        api = Api(env, data_dir / "api-batching.log")
        try:
            serving_overhead(api.base, model, inputs, bare, args.rounds, args.iterations)
            on = concurrent_singles(api.base, model, inputs, args.clients, args.seconds)
        finally:
            api.stop()
        env_off = env | {"SWAV_EMBED_BATCH_WINDOW_MS": "0", "SWAV_EMBED_MAX_BATCH": "1"}
        api = Api(env_off, data_dir / "api-unbatched.log")
        try:
            off = concurrent_singles(api.base, model, inputs, args.clients, args.seconds)
        finally:
            api.stop()
        single, full = bare.rate(20, batch_size=1), bare.rate(args.iterations)
        print(f"{args.clients} concurrent single-image clients, {args.seconds:.0f} s each "
              f"(compute-only ceiling of the gain: bare forward {full:.0f} images/s at batch "
              f"{BATCH} / {single:.0f} at batch 1 = {full / single:.1f}x):")
        print(describe("micro-batching on ", *on))
        print(describe("micro-batching off", *off))
        print(f"  ratio {on[0] / off[0]:.2f}x (goal >= 3x); total {time.monotonic() - began:.0f} s")
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
