"""Runtime settings of the service: one pydantic-settings class read from SWAV_* variables.

With nothing set, everything lives under one data directory (`./var`): SQLite for the
database, Celery's filesystem transport for the broker, and a local artifact folder, so
the service runs with no server. `SWAV_DATABASE_URL` and `SWAV_BROKER_URL` switch to
PostgreSQL (psycopg) and Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWAV_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of every embedded-mode file.")
    database_url: str | None = Field(None, description="Default: SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Default: filesystem transport in data_dir.")
    artifacts_dir: Path | None = Field(None, description="Default: data_dir/artifacts.")

    max_upload_bytes: int = Field(2 * 1024**3, description="Dataset archive size cap (413).")
    max_archive_members: int = 200_000
    max_uncompressed_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 200.0

    train_queue: str = "train"
    short_queue: str = "short"
    events_metrics_every_s: float = Field(1.0, description="Throttle for metric events.")
    cancel_grace_s: float = Field(60.0, description="Hard stop after a cooperative cancel.")
    poll_interval_s: float = 0.5

    # POST /v1/embeddings: request limits, model cache and micro-batching.
    max_embedding_items: int = Field(64, description="Images per embedding request (413).")
    max_image_bytes: int = Field(8 * 1024**2, description="Encoded bytes per image (413).")
    max_image_pixels: int = Field(40_000_000, description="Pixels per image, bomb guard (413).")
    embed_cache_models: int = Field(4, description="Models kept loaded (LRU).")
    embed_cache_bytes: int = Field(2 * 1024**3, description="Parameter bytes kept loaded.")
    embed_batch_window_ms: float = Field(5.0, description="Micro-batch wait; 0 with max 1: off.")
    embed_max_batch: int = Field(64, description="Images per forward pass (micro-batch cap).")
    embed_max_queue_items: int = Field(512, description="Images waiting per model (503).")
    embed_device: str | None = Field(None, description="Default: cuda if available, else cpu.")
    embed_torch_threads: int = Field(0, description="torch intra-op threads; 0: torch default.")
    embed_resolve_ttl_s: float = Field(2.0, description="How long a model id's lookup is reused.")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'swav.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def artifacts(self) -> Path:
        return (self.artifacts_dir or self.data_dir / "artifacts").resolve()

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.artifacts / "datasets" / dataset_id

    def job_dir(self, job_id: str) -> Path:
        return self.artifacts / "jobs" / job_id


@lru_cache
def get_settings() -> Settings:
    return Settings()
