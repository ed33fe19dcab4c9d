"""The caps on one archive (members, uncompressed bytes, expansion ratio) and the capped
writing of its members' data.

Caps are judged on bytes counted as they stream, never on the sizes that headers declare.
A broken global cap refuses the whole archive (`ArchiveRefused`); a member past the ratio
on its own is refused alone and recorded in the `ExtractReport`.
"""

from __future__ import annotations

import lzma
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from swav_core.errors import DataError
from worker.archive_names import MemberRefused, shown_error, shown_name

CHUNK = 1 << 20
# Ratios are judged only past the first MiB: a few flat-colour images legitimately
# compress far beyond any sensible cap.
RATIO_GRACE_BYTES = 1 << 20

# Errors of decoding one member's data (bad CRC, corrupt deflate/bz2/xz stream, cut short).
_MEMBER_DATA_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on one archive: members (of any kind), uncompressed bytes, expansion ratio."""

    max_members: int
    max_total_bytes: int
    max_ratio: float


@dataclass
class ExtractReport:
    """What `extract_archive` wrote: file count, bytes, and each refused member with why."""

    written: int = 0
    total_bytes: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)

    def refuse(self, member: str, reason: str) -> None:
        self.refused.append({"path": shown_name(member), "reason": reason})


class ArchiveRefused(DataError):
    """The whole archive is refused (unreadable, or past a global cap).

    `refused` holds the members refused before that point, for the dataset's report.
    """

    def __init__(self, message: str, refused: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.refused = list(refused or [])


class UnreadableMember(Exception):
    """A member's data could not be decoded (bad CRC, corrupt stream)."""


def check_member_count(limits: ArchiveLimits, seen: int) -> None:
    """Raises ArchiveRefused once `seen` members are more than the cap allows."""
    if seen > limits.max_members:
        raise ArchiveRefused(
            f"the archive has more than {limits.max_members} members "
            "(SWAV_MAX_ARCHIVE_MEMBERS): split it or pack fewer files"
        )


def too_big(limits: ArchiveLimits, member: str) -> ArchiveRefused:
    """The refusal of an archive that expands past the total cap at `member`."""
    return ArchiveRefused(
        f"the archive expands past {limits.max_total_bytes} bytes at member "
        f"{shown_name(member)!r} (SWAV_MAX_UNCOMPRESSED_BYTES): refused as a decompression "
        "bomb; upload a smaller dataset"
    )


def too_compressed(limits: ArchiveLimits, member: str) -> ArchiveRefused:
    """The refusal of an archive that expands past the ratio cap at `member`."""
    return ArchiveRefused(
        f"the archive expands more than {limits.max_ratio:g} times its size at member "
        f"{shown_name(member)!r} (SWAV_MAX_COMPRESSION_RATIO): refused as a decompression bomb"
    )


def copy_capped(
    source: IO[bytes],
    target: Path,
    report: ExtractReport,
    limits: ArchiveLimits,
    member: str,
    member_compressed: int | None = None,
    archive_bytes: int | None = None,
) -> None:
    """Stream `source` into `target`, counting bytes as they arrive.

    Past the total cap raises ArchiveRefused. Past the ratio over `member_compressed`
    (this member alone) raises MemberRefused; past the ratio of all accepted bytes so far
    over `archive_bytes` (many members each under the grace), ArchiveRefused. A decoding
    error of the member's data raises UnreadableMember. The file is removed on any error.
    """
    written = 0
    try:
        with target.open("xb") as out:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except _MEMBER_DATA_ERRORS as exc:
                    raise UnreadableMember(shown_error(exc)) from exc
                if not chunk:
                    break
                written += len(chunk)
                total = report.total_bytes + written
                if total > limits.max_total_bytes:
                    raise too_big(limits, member)
                if member_compressed is not None and written > RATIO_GRACE_BYTES and (
                    written > limits.max_ratio * max(member_compressed, 1)
                ):
                    raise MemberRefused(
                        f"compression ratio above {limits.max_ratio:g} "
                        "(SWAV_MAX_COMPRESSION_RATIO)"
                    )
                if archive_bytes is not None and total > RATIO_GRACE_BYTES and (
                    total > limits.max_ratio * max(archive_bytes, 1)
                ):
                    raise too_compressed(limits, member)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    report.total_bytes += written
    report.written += 1
