"""Safe extraction of an uploaded dataset archive (.zip, .tar, .tar.gz, .tar.bz2, .tar.xz).

Never `extractall`: this Python (3.11.7) predates the 2025 tarfile fixes. Members are
walked one by one; only regular files are written, under names built here from the
member's cleaned path; absolute paths, drive letters, `..`, backslashes, control
characters, symlinks, hardlinks, devices, fifos, sparse and encrypted members are refused.
The member count, the total uncompressed bytes and the compression ratio are capped on
bytes counted as they stream, never on the sizes that headers declare. Each refusal is
recorded with the member's name (as the archive spells it) and the reason; a broken global
cap refuses the whole archive (`ArchiveRefused`). Nothing is written outside `dest`.

The archive kind comes from its first bytes, never from the upload's name. Tar archives
are read as a stream through `_MeteredStream`, which counts every decompressed byte
(headers and skipped members included), and `_BoundedTarInfo` refuses oversized pax or GNU
long-name headers, which tarfile would otherwise read into memory whole.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import tarfile
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Protocol, Self

from swav_core.errors import DataError

CHUNK = 1 << 20
# Ratios are judged only past the first MiB: a few flat-colour images legitimately
# compress far beyond any sensible cap.
RATIO_GRACE_BYTES = 1 << 20
# Tar headers around each member (512-byte header, padding, a small pax record) are part
# of the decompressed stream but not of the members' bytes.
TAR_HEADER_ALLOWANCE = 4096
MAX_HEADER_BYTES = 1 << 20  # a pax or GNU long-name record; real ones are under 1 KiB
MAX_NAME_BYTES = 1024
MAX_PART_BYTES = 255  # NAME_MAX of Linux file systems
SHOWN_NAME_CHARS = 200

_ZIP_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_ZIP_ENCRYPTED = 0x1
_FILE_TYPE_MASK = 0o170000
_REGULAR, _SYMLINK = 0o100000, 0o120000
# Errors of decoding one member's data (bad CRC, corrupt deflate/bz2/xz stream, cut short).
_MEMBER_DATA_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)
_TAR_LONG_HEADERS = frozenset(
    {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
     tarfile.GNUTYPE_LONGLINK}
)


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


class MemberRefused(Exception):
    """One member is refused; `reason` says why, for the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _UnreadableMember(Exception):
    """A member's data could not be decoded (bad CRC, corrupt stream)."""


def shown_name(name: str) -> str:
    """`name` made safe to store and show: invalid UTF-8 and control characters escaped,
    at most SHOWN_NAME_CHARS characters."""
    text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(
        c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
    return text if len(text) <= SHOWN_NAME_CHARS else text[:SHOWN_NAME_CHARS] + "..."


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path to write member `name` to; raises MemberRefused when it could
    escape the dataset folder or cannot be written as it is on every file system."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise MemberRefused("name is not valid UTF-8") from None
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise MemberRefused("control character in the name")
    if "\\" in name:
        raise MemberRefused("backslash in the name (Windows path)")
    if name.startswith("/"):
        raise MemberRefused("absolute path")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts:
        raise MemberRefused("empty name")
    if ":" in parts[0]:
        raise MemberRefused("drive letter or device in the name")
    if ".." in parts:
        raise MemberRefused("'..' in the path")
    if len(encoded) > MAX_NAME_BYTES or any(
        len(p.encode("utf-8")) > MAX_PART_BYTES for p in parts
    ):
        raise MemberRefused("name too long")
    return PurePosixPath(*parts)


def archive_kind(path: Path) -> str:
    """'zip' or 'tar' from the file's first bytes, never from its name."""
    if zipfile.is_zipfile(path):
        return "zip"
    with path.open("rb") as handle:
        head = handle.read(512)
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    raise ArchiveRefused("the upload is not a zip, tar, tar.gz, tar.bz2 or tar.xz archive")


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> ExtractReport:
    """Extract the regular files of the archive at `path` into `dest` (which must be empty).

    Raises ArchiveRefused (a DataError) when the archive is unreadable or breaks a global
    cap (members, total bytes, overall ratio), after removing `dest`; per-member problems
    are refused and reported instead.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    report = ExtractReport()
    try:
        if archive_kind(path) == "zip":
            _extract_zip(path, root, report, limits)
        else:
            _extract_tar(path, root, report, limits)
    except ArchiveRefused as error:
        shutil.rmtree(root, ignore_errors=True)
        error.refused = report.refused + error.refused
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError,
            NotImplementedError, ValueError, struct.error, _UnreadableMember) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise ArchiveRefused(
            f"the archive is corrupt or truncated: {_describe(exc)}", report.refused
        ) from exc
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return report


def _describe(exc: BaseException) -> str:
    """The exception's message, safe to store: no server path (an OSError's file name),
    member names in it escaped as `shown_name` does."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return exc.strerror or type(exc).__name__
    return shown_name(str(exc)) or type(exc).__name__


def _target(root: Path, name: str) -> Path:
    """Where member `name` goes under `root`, parent folders created; MemberRefused if not."""
    target = root.joinpath(*safe_member_path(name).parts)
    if root not in target.parents:
        raise MemberRefused("path outside the dataset")
    if target.exists():
        raise MemberRefused("duplicate member (an earlier member has this path)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MemberRefused("a parent folder is a file of an earlier member") from None
    return target


def _count_member(limits: ArchiveLimits, seen: int) -> None:
    if seen > limits.max_members:
        raise ArchiveRefused(
            f"the archive has more than {limits.max_members} members "
            "(SWAV_MAX_ARCHIVE_MEMBERS): split it or pack fewer files"
        )


def _too_big(limits: ArchiveLimits, member: str) -> ArchiveRefused:
    return ArchiveRefused(
        f"the archive expands past {limits.max_total_bytes} bytes at member "
        f"{shown_name(member)!r} (SWAV_MAX_UNCOMPRESSED_BYTES): refused as a decompression "
        "bomb; upload a smaller dataset"
    )


def _too_compressed(limits: ArchiveLimits, member: str) -> ArchiveRefused:
    return ArchiveRefused(
        f"the archive expands more than {limits.max_ratio:g} times its size at member "
        f"{shown_name(member)!r} (SWAV_MAX_COMPRESSION_RATIO): refused as a decompression bomb"
    )


def _copy_capped(
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
    error of the member's data raises _UnreadableMember. The file is removed on any error.
    """
    written = 0
    try:
        with target.open("xb") as out:
            while True:
                try:
                    chunk = source.read(CHUNK)
                except _MEMBER_DATA_ERRORS as exc:
                    raise _UnreadableMember(_describe(exc)) from exc
                if not chunk:
                    break
                written += len(chunk)
                total = report.total_bytes + written
                if total > limits.max_total_bytes:
                    raise _too_big(limits, member)
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
                    raise _too_compressed(limits, member)
                out.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    report.total_bytes += written
    report.written += 1


# --- zip ----------------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # fields 12-14: name, extra, comment lengths


def zip_entry_count(path: Path, stop_after: int) -> int:
    """Entries in the zip's central directory, counted up to `stop_after` + 1.

    zipfile builds a ZipInfo for every entry before a caller can count them, so a central
    directory of millions of 46-byte entries would exhaust memory first; this walks the
    raw records instead (locating them as zipfile does, zip64 included). 0 when the end
    record is missing, which zipfile then reports as not a zip.
    """
    with path.open("rb") as handle:
        size = handle.seek(0, 2)
        tail_start = max(0, size - _EOCD.size - 0xFFFF)  # the comment is at most 64 KiB
        handle.seek(tail_start)
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            return 0
        location = tail_start + at
        directory_size = _EOCD.unpack_from(tail, at)[5]
        directory_end = location
        locator_at = location - _EOCD64_LOCATOR.size
        if locator_at - _EOCD64.size >= 0:
            handle.seek(locator_at)
            if handle.read(4) == b"PK\x06\x07":
                handle.seek(locator_at - _EOCD64.size)
                record = _EOCD64.unpack(handle.read(_EOCD64.size))
                if record[0] == b"PK\x06\x06":
                    directory_size = record[8]
                    directory_end = locator_at - _EOCD64.size
        handle.seek(max(0, directory_end - directory_size))
        count = consumed = 0
        while consumed < directory_size and count <= stop_after:
            header = handle.read(_CENTRAL_ENTRY.size)
            if len(header) < _CENTRAL_ENTRY.size or header[:4] != b"PK\x01\x02":
                break
            fields = _CENTRAL_ENTRY.unpack(header)
            variable = fields[12] + fields[13] + fields[14]
            handle.seek(variable, 1)
            consumed += _CENTRAL_ENTRY.size + variable
            count += 1
    return count


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    """Why a zip entry cannot be extracted as a regular file, or None."""
    file_type = (info.external_attr >> 16) & _FILE_TYPE_MASK
    if file_type == _SYMLINK:
        return "symlink (only regular files are accepted)"
    if file_type not in (0, _REGULAR):
        return "special file (only regular files are accepted)"
    if info.flag_bits & _ZIP_ENCRYPTED:
        return "encrypted member"
    if info.compress_type not in _ZIP_METHODS:
        return f"unsupported compression method {info.compress_type}"
    return None


def _extract_zip(path: Path, root: Path, report: ExtractReport, limits: ArchiveLimits) -> None:
    _count_member(limits, zip_entry_count(path, limits.max_members))
    archive_bytes = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for seen, info in enumerate(archive.infolist(), 1):
            _count_member(limits, seen)
            name = info.filename
            if info.is_dir():
                continue
            try:
                reason = _zip_refusal(info)
                if reason is not None:
                    raise MemberRefused(reason)
                target = _target(root, name)
                try:
                    source = archive.open(info)
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
                    raise MemberRefused(f"unreadable member: {_describe(exc)}") from exc
                with source:
                    _copy_capped(
                        source, target, report, limits, name, info.compress_size, archive_bytes
                    )
            except MemberRefused as refusal:
                report.refuse(name, refusal.reason)
            except _UnreadableMember as exc:
                report.refuse(name, f"corrupt member: {exc}")


# --- tar ----------------------------------------------------------------------------------


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
            raise _too_big(self.limits, self.member or "(headers)")
        if self.inner is not self.raw and self.count > RATIO_GRACE_BYTES and (
            self.count > self.limits.max_ratio * max(self.raw.tell(), 1)
        ):
            raise _too_compressed(self.limits, self.member or "(headers)")
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


def _extract_tar(path: Path, root: Path, report: ExtractReport, limits: ArchiveLimits) -> None:
    # typeshed wants write/seek/tell on `fileobj` too; mode "r|" only ever reads.
    with _tar_stream(path, limits) as stream, tarfile.open(
        fileobj=stream,  # type: ignore[call-overload]
        mode="r|",
        tarinfo=_BoundedTarInfo,
    ) as archive:
        for seen, member in enumerate(archive, 1):
            _count_member(limits, seen)
            stream.member = member.name
            if member.isdir():
                continue
            try:
                reason = _tar_refusal(member)
                if reason is not None:
                    raise MemberRefused(reason)
                target = _target(root, member.name)
                source = archive.extractfile(member)
                if source is None:
                    raise MemberRefused("unreadable member")
                with source:
                    _copy_capped(source, target, report, limits, member.name)
            except MemberRefused as refusal:
                report.refuse(member.name, refusal.reason)
