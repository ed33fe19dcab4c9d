"""Schema-driven fuzzing: schemathesis against a live `swav-service api` with an API key.

The API runs on a migrated PostgreSQL database with Redis as the broker (no worker), with
real objects of the key's tenant in it: datasets, jobs in several states, a real cpu-tiny
checkpoint on disk (so downloads, exports and embeddings reach their 200s) and a pruned
one, and embedding jobs with and without files. schemathesis reads `/openapi.json` and
sends generated requests to every operation, drawing path and body ids from those
objects most of the time (`schemathesis.toml` dictionaries), the rest at random.

It fails on any 5xx and on any response that breaks the document: an undocumented status
or content type, a body that does not match its schema (errors included: every 4xx/5xx
is documented as the error envelope), an `Allow` header that differs from the documented
methods, invalid input accepted, or auth ignored. Left out: `positive_data_acceptance`
(schema-valid requests that are rightly refused for what a schema cannot say: a .png
where an archive is due, a pruned checkpoint, an unknown preset), response-time limits
(the first embedding loads torch; CI machines are shared) and
`object_level_authorization` (tests/api/test_auth.py covers tenants). The run is bounded
(examples per operation, a fixed seed) to well under a minute of fuzzing on two cores.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from sqlalchemy.orm import Session

from swav_core.checkpoint import save_checkpoint
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_service.db import make_engine
from swav_service.models import Checkpoint, Dataset, EmbeddingJob, Job, new_id
from tests.conftest import BIN, Service, create_database, drop_database, migrate, service_env

MAX_EXAMPLES = 12  # per operation and phase; with the coverage phase about 1 500 requests
SEED = 20_240_611
RUN_TIMEOUT_S = 300
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
    "ignored_auth",
)


@dataclass
class Seeded:
    datasets: list[str]
    jobs: list[str]
    checkpoints: list[str]
    embedding_jobs: list[str]


def seed(url: str, artifacts: Path) -> Seeded:
    """Objects of tenant "local" in every state a route distinguishes."""
    config = config_from("cpu-tiny")
    torch.manual_seed(0)
    state = {"model": SwAVModel.from_config(config).state_dict(),
             "config": config.model_dump(mode="json")}
    ids = Seeded([new_id("ds"), new_id("ds")], [new_id("job") for _ in range(3)], [], [])
    kept, spare = ids.datasets  # kept: an active job uses it, so it cannot be deleted
    running, succeeded, failed = ids.jobs
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            for dataset_id in ids.datasets:
                session.add(Dataset(id=dataset_id, tenant="local", name="shapes",
                                    status="ready", archive_bytes=1000, num_images=8,
                                    num_skipped=0, classes=["a", "b"]))
            session.flush()
            for job_id, status in zip(ids.jobs, ("running", "succeeded", "failed"), strict=True):
                session.add(Job(id=job_id, tenant="local", dataset_id=kept, status=status,
                                preset="cpu-tiny", config=config.model_dump(mode="json"),
                                epochs=config.epochs, step=4, total_steps=8))
            session.flush()
            info = save_checkpoint(artifacts / "jobs" / succeeded / "run", state, step=8,
                                   keep_last=2, final=True)
            assert info.sha256 is not None and info.size is not None
            final = Checkpoint(id=new_id("ckpt"), job_id=succeeded, step=8, epoch=2, final=True,
                               path=str(info.path.relative_to(artifacts)),
                               size_bytes=info.size, sha256=info.sha256)
            pruned = Checkpoint(id=new_id("ckpt"), job_id=running, step=2, epoch=1,
                                final=False, path=f"jobs/{running}/run/gone.pt",
                                size_bytes=10, sha256="0" * 64, available=False)
            session.add_all([final, pruned])
            session.flush()
            ids.checkpoints = [final.id, pruned.id]
            done, queued = new_id("emb"), new_id("emb")
            folder = artifacts / "embeddings" / done
            folder.mkdir(parents=True)
            np.save(folder / "embeddings.npy", np.zeros((2, 4), dtype=np.float32))
            (folder / "index.json").write_text(json.dumps(["a/0.png", "b/0.png"]))
            for embedding_id, status in ((done, "succeeded"), (queued, "queued")):
                session.add(EmbeddingJob(
                    id=embedding_id, tenant="local", job_id=succeeded, checkpoint_id=final.id,
                    dataset_id=kept, layer="backbone", status=status,
                    num_rows=2 if status == "succeeded" else None,
                    path=f"embeddings/{done}" if status == "succeeded" else None))
            ids.embedding_jobs = [done, queued]
            session.commit()
    finally:
        engine.dispose()
    return ids


def config_file(path: Path, ids: Seeded) -> Path:
    """schemathesis.toml: ids drawn from the seeded objects 80% of the time."""
    dictionaries = {
        "dataset_ids": ids.datasets,
        "job_ids": ids.jobs,
        "checkpoint_ids": ids.checkpoints,
        "embedding_job_ids": ids.embedding_jobs,
        "model_ids": ids.jobs + ids.checkpoints,
    }
    bindings = {
        "path.dataset_id": "dataset_ids",
        "body.dataset_id": "dataset_ids",
        "path.job_id": "job_ids",
        "path.checkpoint_id": "checkpoint_ids",
        "body.checkpoint_id": "checkpoint_ids",
        "path.embedding_job_id": "embedding_job_ids",
        "body.model": "model_ids",
    }
    lines = []
    for name, values in dictionaries.items():
        lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}", ""]
    lines.append("[parameters]")
    for key, name in bindings.items():
        lines.append(f'"{key}" = {{ dictionary = "{name}", probability = 0.8 }}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def seeded_api(tmp_path: Path) -> Iterator[tuple[Service, Seeded]]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = create_database()
    redis_db = 1 + int(secrets.token_hex(1), 16) % 14
    redis.Redis.from_url(f"redis://127.0.0.1:6379/{redis_db}").flushdb()
    env = service_env(data_dir, url, f"redis://127.0.0.1:6379/{redis_db}")
    env["SWAV_EMBED_TORCH_THREADS"] = "1"
    service = Service(env, data_dir)
    try:
        migrate(env)
        ids = seed(url, (data_dir / "artifacts").resolve())
        service.start_api()
        yield service, ids
    finally:
        service.stop()
        drop_database(url)


def test_schemathesis_finds_no_server_error_or_schema_violation(
    seeded_api: tuple[Service, Seeded], tmp_path: Path
) -> None:
    service, ids = seeded_api
    command = [
        str(BIN / "schemathesis"),
        "--config-file", str(config_file(tmp_path / "schemathesis.toml", ids)),
        "run", f"{service.base_url}/openapi.json",
        "--header", f"Authorization: Bearer {service.ensure_key()}",
        "--checks", ",".join(CHECKS),
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        # One thread: on CPython 3.11, hypothesis describing strategies in two threads at
        # once can crash in ast.parse ("AST constructor recursion depth mismatch").
        "--workers", "1",
        "--request-timeout", "30",
        "--no-shrink",
        "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                            cwd=tmp_path)
    report = result.stdout[-12_000:] + result.stderr[-3_000:]
    assert result.returncode == 0, f"{report}\n--- API log ---\n{service.logs()}"
    assert " passed" in result.stdout and "failed" not in result.stdout.split("SUMMARY")[-1]
