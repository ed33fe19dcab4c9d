"""Removing a deleted dataset's images from the artifact store, in the background.

`DELETE /v1/datasets/{id}` removes the API machine's files and commits the deletion; it
never waits on the store, so a store outage cannot fail it. Each reconciler pass
(worker/reconciler.py) then lists the dataset folders the store holds and removes those
of datasets that are deleted or gone from the database. A pass that fails leaves them
for the next one, and a crash between the commit and the removal loses nothing: the
store itself says what is left to remove.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from swav_service.db import session_scope
from swav_service.models import DELETED_DATASET, Dataset
from swav_service.settings import Settings
from swav_service.storage import StorageError, artifact_store

log = logging.getLogger(__name__)


def purge_deleted_datasets(settings: Settings) -> int:
    """Remove the store's folders of deleted datasets; how many. 0 without a remote store.

    A folder is kept while its dataset's row is in any other status: a dataset's row is
    committed before its images are uploaded, so an ingestion in flight is never removed.
    """
    store = artifact_store(settings)
    if not store.remote:
        return 0
    parent = settings.artifacts / "datasets"
    try:
        stored = store.folders(parent)
        if not stored:
            return 0
        with session_scope() as session:
            kept = set(
                session.scalars(
                    select(Dataset.id).where(
                        Dataset.id.in_(stored), Dataset.status != DELETED_DATASET
                    )
                )
            )
        purged = 0
        for dataset_id in stored:
            if dataset_id not in kept:
                store.delete_tree(parent / dataset_id)
                purged += 1
        return purged
    except StorageError as error:
        log.warning("deleted datasets stay in the store until the next pass: %s", error)
        return 0
