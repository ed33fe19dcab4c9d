"""Extraction of a tar archive's regular files (plain, gzip, bzip2 or xz), as a stream.

The archive is read in stream mode through `_MeteredStream`, which counts every
decompressed byte (headers and skipped members included) against the caps, and
`_BoundedTarInfo` refuses oversized pax or GNU long-name headers, which tarfile would
otherwise read into memory whole. Members are taken one by one; never `extractall`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol, Self

from worker.archive_caps import (
    CHUNK,
    RATIO_GRACE_BYTES,
    ArchiveLimits,
    ArchiveRefused,
    ExtractReport,
    check_member_count,
    copy_capped,
    too_big,
    too_compressed,
)
from worker.archive_names import MemberRefused, member_target

# Tar headers around each member (512-byte header, padding, a small pax record) are part
# of the decompressed stream but not of the members' bytes.
TAR_HEADER_ALLOWANCE = 4096
MAX_HEADER_BYTES = 1 << 20  # a pax or GNU long-name record; real ones are under 1 KiB

_TAR_LONG_HEADERS = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
     tarfile.GNUTYPE_LONGLINK}
)


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _MeteredStream:
    """The decompressed tar stream, counted: every read adds to `count`.

    Past `budget` bytes, or past `max_ratio` times the compressed bytes consumed (after
    RATIO_GRACE_BYTES), it raises ArchiveRefused, whatever part of the stream (member data,
    headers, a skipped member) is being read.
    """

    def __init__(self, inner: _Readable, raw: BinaryIO, limits: ArchiveLimits) -> None:
        self.inner = inner
        self.raw = raw
        self.limits = limits
        self.budget = limits.max_total_bytes + TAR_HEADER_ALLOWANCE * (limits.max_members + 2)
        self.count = 0
        self.member = ""

    def read(self, size: int = -1) -> bytes:
        wanted = CHUNK if size is None or size < 0 else size
        data = self.inner.read(min(wanted, self.budget - self.count + 1))
        self.count += len(data)
        if self.count > self.budget:
            raise too_big(self.limits, self.member or "(headers)")
        if self.inner is not self.raw and self.count > RATIO_GRACE_BYTES and (
            self.count > self.limits.max_ratio * max(self.raw.tell(), 1)
        ):
            raise too_compressed(self.limits, self.member or "(headers)")
        return data


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses pax and GNU long-name records over MAX_HEADER_BYTES.

    tarfile reads such a record into memory in one piece, with the size its header
    declares; every header of the archive passes through `frombuf`.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _TAR_LONG_HEADERS and info.size > MAX_HEADER_BYTES:
            raise ArchiveRefused(
                f"a tar extended header declares {info.size} bytes (more than "
                f"{MAX_HEADER_BYTES}): refused as malformed"
            )
        return info


@contextmanager
def _tar_stream(path: Path, limits: ArchiveLimits) -> Iterator[_MeteredStream]:
    """The archive's decompressed bytes (gzip, bzip2, xz or none, told by magic), metered."""
    with ExitStack() as stack:
        raw = stack.enter_context(path.open("rb"))
        magic = raw.read(6)
        raw.seek(0)
        inner: _Readable
        if magic.startswith(b"\x1f\x8b"):
            inner = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic.startswith(b"BZh"):
            inner = stack.enter_context(bz2.BZ2File(raw))
        elif magic.startswith(b"\xfd7zXZ\x00"):
            inner = stack.enter_context(lzma.LZMAFile(raw))
        else:
            inner = raw
        yield _MeteredStream(inner, raw, limits)


def _tar_refusal(member: tarfile.TarInfo) -> str | None:
    """Why a tar member cannot be extracted as a regular file, or None."""
    if member.issym():
        return "symlink (only regular files are accepted)"
    if member.islnk():
        return "hardlink (only regular files are accepted)"
    if member.ischr() or member.isblk():
        return "device (only regular files are accepted)"
    if member.isfifo():
        return "fifo (only regular files are accepted)"
    if member.issparse():
        return "sparse file (only regular files are accepted)"
    if not member.isreg():
        return "special file (only regular files are accepted)"
    return None


def extract_tar(path: Path, root: Path, report: ExtractReport, limits: ArchiveLimits) -> None:
    """Write the tar's regular files under `root`; refused members go to `report`."""
    # typeshed wants write/seek/tell on `fileobj` too; mode "r|" only ever reads.
    with _tar_stream(path, limits) as stream, tarfile.open(
        fileobj=stream,  # type: ignore[call-overload]
        mode="r|",
        tarinfo=_BoundedTarInfo,
    ) as archive:
        for seen, member in enumerate(archive, 1):
            check_member_count(limits, seen)
            stream.member = member.name
            if member.isdir():
                continue
            try:
                target = member_target(root, member.name, _tar_refusal(member))
                source = archive.extractfile(member)
                if source is None:
                    raise MemberRefused("unreadable member")
                with source:
                    copy_capped(source, target, report, limits, member.name)
            except MemberRefused as refusal:
                report.refuse(member.name, refusal.reason)
