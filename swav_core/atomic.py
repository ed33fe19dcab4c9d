"""Files that are replaced whole or not at all, and survive a crash once written.

A write goes to a temporary name in the same folder, is flushed and fsynced, renamed over
the final name (atomic on POSIX), and the folder is fsynced (the rename is durable only
then): a reader sees the old file or the new one, never a torn one. Checkpoints, their
sidecars, job outcomes, embeddings and downloads from the artifact store all use it.
Torch-free, so the service layer can use it too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(folder: Path) -> None:
    """Persist the entries of `folder` (a rename is durable only once its folder is synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden, unique name beside `path` for writing it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` atomically and durably when the block exits cleanly.

    Writes go to a temporary file in the same folder; on success it is flushed, fsynced,
    renamed onto `path`, and the folder is fsynced. On any exception the temporary file is
    removed, `path` is left as it was, and the exception propagates (OSError as is).
    """
    path = Path(path)
    temp = temp_path(path)
    try:
        with open(temp, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (see `atomic_writer`)."""
    with atomic_writer(path) as file:
        file.write(data)
