"""Upload bodies streamed from disk: a folder packed to tar on the fly, or an archive file.

Nothing is built in memory or on disk first. A folder is scanned once (names, sizes,
mtimes); its tar headers are then computed twice, once to know the exact length (so the
request carries a Content-Length, which the server checks against its upload cap before
reading anything) and once while streaming. Each file is read in chunks straight into the
request; a file that changed size in between raises `FolderChanged` rather than send a
corrupt archive.
"""

from __future__ import annotations

import os
import secrets
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from swav_client.errors import FolderChanged, NotUploadable

CHUNK_BYTES = 1 << 20  # the server hands its multipart parser 1 MiB at a time too
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")  # what POST /v1/datasets accepts
BLOCK = tarfile.BLOCKSIZE  # 512: tar pads every header and file to whole blocks
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)

# Called with the bytes just handed over (or received) and the total, when known.
TransferProgress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class TarMember:
    path: Path
    arcname: str  # relative POSIX path inside the archive
    size: int
    mtime: int

    def header(self) -> bytes:
        info = tarfile.TarInfo(self.arcname)
        info.size = self.size
        info.mtime = self.mtime  # an int: a float mtime would add a PAX record
        info.mode = 0o644
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def scan_folder(folder: Path) -> list[TarMember]:
    """The regular files under `folder`, sorted, hidden entries left out.

    The server ignores hidden files and folders when it reads a dataset
    (`swav_core.image_folder`), so they are not sent. Symlinked folders are not followed.
    """
    members: list[TarMember] = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        base = Path(directory)
        for name in sorted(names):
            path = base / name
            if name.startswith(".") or not path.is_file():
                continue
            stat = path.stat()
            arcname = path.relative_to(folder).as_posix()
            members.append(TarMember(path, arcname, stat.st_size, int(stat.st_mtime)))
    return members


def padding(size: int) -> int:
    return -size % BLOCK


def tar_length(members: Iterable[TarMember]) -> int:
    """Bytes `tar_chunks(members)` yields: headers, data padded to blocks, end marker."""
    return sum(len(m.header()) + m.size + padding(m.size) for m in members) + len(END_OF_ARCHIVE)


def _read_exactly(member: TarMember) -> Iterator[bytes]:
    remaining = member.size
    with open(member.path, "rb") as f:
        while remaining:
            chunk = f.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
        if remaining or f.read(1):
            raise FolderChanged(
                f"{member.path} changed size while it was uploaded; upload the folder again"
            )


def tar_pieces(members: Iterable[TarMember]) -> Iterator[bytes]:
    """An uncompressed POSIX (pax) tar of `members`, piece by piece."""
    for member in members:
        yield member.header()
        yield from _read_exactly(member)
        yield b"\0" * padding(member.size)
    yield END_OF_ARCHIVE


def file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def coalesce(pieces: Iterable[bytes], size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Regroup small pieces (tar headers, small images) into writes of about `size`."""
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) >= size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def _quote(value: str) -> str:
    # As browsers and httpx escape a multipart parameter value.
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace(
        "\n", "%0A"
    )


@dataclass(frozen=True)
class UploadBody:
    """A multipart/form-data body: an optional `name` field and the `file` part.

    `chunks()` can be called again (a retry re-reads the files from the start).
    """

    filename: str
    name: str | None
    file_length: int
    file_pieces: Callable[[], Iterator[bytes]]
    boundary: str

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def _head(self) -> bytes:
        head = b""
        if self.name is not None:
            head += (
                f'--{self.boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n'
            ).encode() + self.name.encode() + b"\r\n"
        head += (
            f"--{self.boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{_quote(self.filename)}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        return head

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def length(self) -> int:
        return len(self._head()) + self.file_length + len(self._tail())

    def chunks(self, progress: TransferProgress | None = None) -> Iterator[bytes]:
        pieces = [iter([self._head()]), self.file_pieces(), iter([self._tail()])]
        total = self.length
        for chunk in coalesce(piece for part in pieces for piece in part):
            yield chunk
            if progress is not None:
                progress(len(chunk), total)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def upload_body(path: Path, name: str | None = None) -> UploadBody:
    """The body that uploads `path`: a folder as `<folder>.tar`, or an archive as is.

    Raises FileNotFoundError, or NotUploadable for an empty folder or a file that is not
    a zip or tar archive.
    """
    boundary = secrets.token_hex(16)
    if path.is_dir():
        members = scan_folder(path)
        if not members:
            raise NotUploadable(f"{path} holds no files to upload")
        folder_name = path.resolve().name or "dataset"
        return UploadBody(
            f"{folder_name}.tar", name, tar_length(members), lambda: tar_pieces(members), boundary
        )
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not is_archive(path):
        raise NotUploadable(
            f"{path} is not a folder or an archive; upload a folder, or one of "
            f"{', '.join(ARCHIVE_SUFFIXES)}"
        )
    return UploadBody(path.name, name, path.stat().st_size, lambda: file_pieces(path), boundary)
