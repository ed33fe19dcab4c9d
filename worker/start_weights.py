"""The file a job's fresh run starts from (`start_from` at submit), on this machine.

A job row names a checkpoint (`start_checkpoint_id`) or uploaded weights
(`start_weights_id`); this finds the file under the artifacts folder, fetched from the S3
store first when this machine lacks it (a checkpoint with its sidecar, which the trainer
verifies). A row or file that is gone still yields a path, one that does not exist and is
named for the id: the trainer then fails the job with `invalid_weights` saying so, and
only if the run starts fresh (a resumed run keeps its own checkpoint and needs no file).
"""

from __future__ import annotations

from pathlib import Path

from swav_core.checkpoint_names import sidecar_path
from swav_service.db import session_scope
from swav_service.layout import weights_path
from swav_service.models import Checkpoint, Job, Weights
from swav_service.settings import Settings
from swav_service.storage import artifact_store


def start_weights_file(job: Job, settings: Settings) -> Path | None:
    """The checkpoint or weights file `job` starts from, or None when it names none."""
    if job.start_checkpoint_id is None and job.start_weights_id is None:
        return None
    store = artifact_store(settings)
    with session_scope() as session:
        if job.start_checkpoint_id is not None:
            row = session.get(Checkpoint, job.start_checkpoint_id)
            if row is None or not row.available:
                return settings.artifacts / "gone" / f"{job.start_checkpoint_id}.pt"
            path = settings.artifacts / row.path
            store.fetch(sidecar_path(path))
        else:
            weights = session.get(Weights, job.start_weights_id)
            if weights is None or weights.tenant != job.tenant:
                return weights_path(settings, str(job.start_weights_id))
            path = settings.artifacts / weights.path
    store.fetch(path)
    return path
