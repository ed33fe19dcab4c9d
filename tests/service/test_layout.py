"""The file layout the API and the workers share (swav_service/layout.py)."""

from __future__ import annotations

from pathlib import Path

from swav_service.layout import dataset_images_dir, embeddings_dir, job_run_dir
from swav_service.settings import Settings


def test_every_path_is_under_the_artifacts_folder(tmp_path: Path) -> None:
    """The workers write and the API serves these paths, often on different machines
    (a shared folder or the S3 store mirrors the layout): each lies under `artifacts`."""
    settings = Settings(data_dir=tmp_path)
    artifacts = settings.artifacts
    assert dataset_images_dir(settings, "ds_1") == artifacts / "datasets" / "ds_1" / "images"
    assert job_run_dir(settings, "job_1") == artifacts / "jobs" / "job_1" / "run"
    assert embeddings_dir(settings, "emb_1") == artifacts / "embeddings" / "emb_1"
    assert Path(artifacts).is_relative_to(tmp_path)
