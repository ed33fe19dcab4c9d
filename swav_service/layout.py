"""Where the service's files live under the artifacts folder, named once.

The workers write these files and the API serves them, often from different machines
(a shared folder or the S3 store mirrors the same layout), so both sides take the paths
and names from here instead of repeating them:

    datasets/<dataset_id>/images/            the validated images of an ingested dataset
    datasets/<dataset_id>/prepared/          the same images decoded (swav_core/prepared.py)
    jobs/<job_id>/run/                       a training run (checkpoints/, events, logs)
    weights/<weights_id>.safetensors         uploaded weights that jobs may start from
    embeddings/<embedding_job_id>/           a batch embedding job's two files:
        embeddings.npy                       N x D float32 rows
        index.json                           the N image paths, row i is the image at [i]

Inside a run folder, the checkpoints are named as swav_core/checkpoint_names.py says.
"""

from __future__ import annotations

from pathlib import Path

from swav_service.settings import Settings

EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.json"


def dataset_images_dir(settings: Settings, dataset_id: str) -> Path:
    """The folder of a dataset's validated images (what training and embedding read)."""
    return settings.dataset_dir(dataset_id) / "images"


def dataset_prepared_dir(settings: Settings, dataset_id: str) -> Path:
    """The folder of a dataset's prepared copy: its images decoded once, in the images
    folder's scan order (complete only with its manifest, swav_core/prepared.py)."""
    return settings.dataset_dir(dataset_id) / "prepared"


def job_run_dir(settings: Settings, job_id: str) -> Path:
    """A job's run folder: the trainer's checkpoints, events and log."""
    return settings.job_dir(job_id) / "run"


def embeddings_dir(settings: Settings, embedding_job_id: str) -> Path:
    """The folder of a batch embedding job's `EMBEDDINGS_FILE` and `INDEX_FILE`."""
    return settings.artifacts / "embeddings" / embedding_job_id


def weights_path(settings: Settings, weights_id: str) -> Path:
    """An uploaded weights file (a safetensors state dict a job may start from)."""
    return settings.artifacts / "weights" / f"{weights_id}.safetensors"
