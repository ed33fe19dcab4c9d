"""Runtime settings of the service: one pydantic-settings class read from SWAV_* variables.

With nothing set, everything lives under one data directory (`./var`): SQLite for the
database, Celery's filesystem transport for the broker, and a local artifact folder, so
the service runs with no server. `SWAV_DATABASE_URL` and `SWAV_BROKER_URL` switch to
PostgreSQL (psycopg) and Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWAV_", extra="ignore")

    data_dir: Path = Field(Path("var"), description="Root of every embedded-mode file.")
    database_url: str | None = Field(None, description="Default: SQLite in data_dir.")
    broker_url: str | None = Field(None, description="Default: filesystem transport in data_dir.")
    artifacts_dir: Path | None = Field(None, description="Default: data_dir/artifacts.")

    max_upload_bytes: int = Field(2 * 1024**3, description="Dataset archive size cap (413).")
    max_weights_bytes: int = Field(
        2 * 1024**3, ge=1, description="Uploaded weights file size cap (413)."
    )
    max_archive_members: int = Field(200_000, description="Archive members of any kind.")
    max_uncompressed_bytes: int = Field(8 * 1024**3, description="Bytes the archive expands to.")
    max_compression_ratio: float = Field(200.0, description="Expanded / compressed bytes.")
    max_dataset_image_pixels: int | None = Field(
        None,
        description="Width x height above which a dataset image is skipped as a "
        "decompression bomb. Default: Pillow's limit (89.5 M); effective up to twice that.",
    )

    prepared_max_short_side: int = Field(
        256,
        ge=1,
        description="Shorter side (px) above which an image is downscaled in the dataset's "
        "prepared copy (decoded uint8, swav_core/prepared.py); at least the largest crop "
        "(224 in every preset); smaller images are kept as they are, never upscaled.",
    )
    train_from_prepared: bool = Field(
        True,
        description="Train from the dataset's prepared copy, its crops made in batches "
        "(swav_core/prepared_loader.py; on the GPU when the job has one), instead of "
        "decoding the images with PIL, when the copy is complete and its cap covers the "
        "job's largest crop. Same crop distributions; on a 2-core CPU 1.5-2.1x the steps "
        "in a budget (docs/quality_data_paths.json). false: always decode with PIL.",
    )

    train_queue: str = Field(
        "train", description="Broker queue of training jobs (with N GPUs per node: .gpusN)."
    )
    short_queue: str = Field(
        "short", description="Broker queue of ingestion, embedding and evaluation tasks."
    )
    events_metrics_every_s: float = Field(1.0, description="Throttle for metric events.")
    max_events_per_job: int = Field(
        10_000, ge=0, description="Events a job's log keeps (0: no cap); past it, every "
        "other metrics and epoch event is removed, lifecycle events never (job_state.py)."
    )
    cancel_grace_s: float = Field(60.0, description="Hard stop after a cooperative cancel.")
    cancel_poll_s: float = Field(
        1.0, gt=0, description="How often a runner reads its job's status between lease "
        "renewals, so a cancel reaches the training within about this long."
    )
    poll_interval_s: float = Field(
        0.5, description="How often a runner polls its child and an event stream its job."
    )

    # Leases and recovery (worker/runner.py, worker/reconciler.py).
    lease_ttl_s: float = Field(60.0, description="A runner silent this long is presumed dead.")
    lease_renew_s: float = Field(10.0, description="How often a runner renews its lease.")
    shutdown_grace_s: float = Field(
        60.0, description="On SIGTERM: time for the run to checkpoint before it is killed."
    )
    run_lock_wait_s: float = Field(
        60.0,
        description="How long a runner waits for a job's run folder while an earlier training "
        "process still holds it (worker/fence.py) before it hands the job back to the queue.",
    )
    reconcile_interval_s: float = Field(15.0, description="How often a worker reconciles.")
    resend_after_s: float = Field(
        60.0, description="A queued job whose message is not in the broker this long is re-sent."
    )
    worker_heartbeat_s: float = Field(10.0, description="How often a worker says it is alive.")
    short_task_lease_s: float = Field(
        30.0,
        gt=0,
        description="A short task (ingestion, batch embedding, evaluation) whose worker is "
        "silent this long is presumed lost and sent again; renewed every third of it.",
    )
    short_task_max_attempts: int = Field(
        3,
        ge=1,
        description="Claims a short task may lose before its row fails with `worker_lost`.",
    )

    # What a training worker offers (worker/resources.py) and multi-node jobs (worker/gang.py).
    worker_gpus: int | None = Field(
        None, ge=0, description="GPUs this worker gives to jobs. Default: all it sees."
    )
    worker_cpu_ranks: int | None = Field(
        None,
        ge=1,
        description="On a worker without a GPU: how many CPU processes (gloo ranks) one job "
        "may run here. Default: the number of cores.",
    )
    worker_address: str | None = Field(
        None,
        description="Host name or IP the other nodes of a multi-node job reach this worker "
        "at (its rendezvous endpoint and process group). Default: this host's name.",
    )
    gang_wait_s: float = Field(
        600.0,
        description="How long a worker holding a node rank of a multi-node job waits for the "
        "other nodes before it gives the rank back (and the job's message to the queue).",
    )

    # Shared artifact storage (swav_service/storage.py). The artifacts folder may itself be shared
    # (NFS); with `storage_url`, checkpoints and dataset images are also kept in an
    # S3-compatible store that every machine reads from.
    storage_url: str | None = Field(
        None,
        description="s3://bucket/prefix: keep artifacts in an S3-compatible store as well; "
        "default: the artifacts folder only (local disk or NFS).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="e.g. http://minio:9000; default: AWS's endpoint for the region."
    )
    s3_region: str | None = Field(None, description="Default: boto3's (AWS_DEFAULT_REGION).")
    s3_access_key_id: str | None = Field(None, description="Default: boto3's credential chain.")
    s3_secret_access_key: SecretStr | None = Field(None, description="With s3_access_key_id.")

    max_json_body_bytes: int = Field(
        1024**2, ge=1024, description="A JSON request body (413); uploads and images have theirs."
    )

    # What one job's config may ask for (swav_service/config_limits.py; 422 at submit).
    max_crop_px: int = Field(1024, ge=1, description="Largest crop side, px (size_crops).")
    max_crops: int = Field(32, ge=1, description="Crops per image, all resolutions.")
    max_crop_groups: int = Field(8, ge=1, description="Crop resolutions (list lengths).")
    max_batch_size: int = Field(65536, ge=1, description="Global batch size.")
    max_prototypes: int = Field(65536, ge=2, description="n_prototypes.")
    max_hidden_mlp: int = Field(16384, ge=0, description="hidden_mlp.")
    max_feat_dim: int = Field(4096, ge=1, description="feat_dim.")
    max_queue_length: int = Field(65536, ge=0, description="queue_length.")
    max_sinkhorn_iterations: int = Field(100, ge=1, description="sinkhorn_iterations.")
    max_num_workers: int = Field(32, ge=0, description="Loader processes per rank.")
    max_keep_last: int = Field(100, ge=1, description="Checkpoints kept besides the final.")
    max_total_steps: int = Field(
        100_000_000, ge=1, description="epochs x steps per epoch (capped at 2^31-1)."
    )
    max_checkpoints_per_job: int = Field(
        10_000, ge=1, description="Checkpoints one run writes (checkpoint_every_*)."
    )

    # POST /v1/embeddings: request limits, model cache and micro-batching.
    max_embedding_items: int = Field(64, description="Images per embedding request (413).")
    max_image_bytes: int = Field(8 * 1024**2, description="Encoded bytes per image (413).")
    max_image_pixels: int = Field(40_000_000, description="Pixels per image, bomb guard (413).")
    max_request_pixels: int = Field(
        200_000_000, ge=1, description="Pixels of one request's images together (413)."
    )
    embed_cache_models: int = Field(4, description="Models kept loaded (LRU).")
    embed_cache_bytes: int = Field(2 * 1024**3, description="Parameter bytes kept loaded.")
    embed_batch_window_ms: float = Field(5.0, description="Micro-batch wait; 0 with max 1: off.")
    embed_max_batch: int = Field(64, description="Images per forward pass (micro-batch cap).")
    embed_max_queue_items: int = Field(512, description="Images waiting per model (503).")
    embed_device: str | None = Field(None, description="Default: cuda if available, else cpu.")
    embed_torch_threads: int = Field(0, description="torch intra-op threads; 0: torch default.")
    embed_resolve_ttl_s: float = Field(2.0, description="How long a model id's lookup is reused.")

    # Authentication and per-tenant limits (0 turns a limit off).
    auth_enabled: bool = Field(
        True,
        description="Require `Authorization: Bearer <key>` (swav-service create-key); false: "
        "no authentication, every request is tenant `local`.",
    )
    tenant_max_active_jobs: int = Field(
        32, ge=0, description="Queued, running or cancelling jobs per tenant (429)."
    )
    tenant_max_stored_bytes: int = Field(
        100 * 1024**3, ge=0,
        description="Bytes a tenant stores: archives, images, checkpoints, exports, embeddings.",
    )
    tenant_max_short_tasks: int = Field(
        16, ge=0, description="Quality reports and embedding jobs a tenant has in flight (429)."
    )
    short_task_stale_s: float = Field(
        3600.0, gt=0, description="A requested quality report not done by then may be asked again."
    )
    tenant_max_streams: int = Field(
        16, ge=0, description="Event streams a tenant may hold open per API process (429)."
    )
    tenant_embed_rate_per_s: float = Field(
        20.0, ge=0, description="POST /v1/embeddings requests per second per tenant (429)."
    )
    tenant_embed_burst: int = Field(
        100, ge=1, description="Embedding requests a tenant may send at once above the rate."
    )
    tenant_thumbnails_per_s: float = Field(
        50.0, ge=0, description="Dashboard thumbnails per second per tenant (429); each "
        "decodes a full image, so an unbounded rate is a cheap way to load the API."
    )
    tenant_thumbnails_burst: int = Field(
        200, ge=1, description="Thumbnails a tenant may ask for at once above the rate."
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'swav.db').resolve()}"

    @property
    def embedded_database(self) -> bool:
        """A SQLite file on this machine (the default), not a database server: the CLI may
        create and migrate it on demand, while a server's schema is the operator's call."""
        return self.resolved_database_url.startswith("sqlite")

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
