"""A Python client and the `swav` command for swav-service's REST API.

    from swav_client import SwavClient

    with SwavClient("http://127.0.0.1:8000", api_key=...) as client:
        dataset = client.wait_dataset(client.upload_dataset("images/").id)
        job = client.create_job(dataset.id, preset="cpu-tiny", config={"epochs": 10})
        for event in client.stream_events(job.id):
            ...
"""

from swav_client.client import SwavClient
from swav_client.errors import (
    ApiError,
    ChecksumMismatch,
    FolderChanged,
    NotUploadable,
    ServerUnreachable,
    SwavClientError,
)
from swav_client.types import Checkpoint, Dataset, Embeddings, Event, Job, Page, Progress

__all__ = [
    "ApiError",
    "Checkpoint",
    "ChecksumMismatch",
    "Dataset",
    "Embeddings",
    "Event",
    "FolderChanged",
    "Job",
    "NotUploadable",
    "Page",
    "Progress",
    "ServerUnreachable",
    "SwavClient",
    "SwavClientError",
]
