"""Extraction of a zip archive's regular files, member by member, under the caps.

The member count is checked on the raw central directory before zipfile reads it
(`zip_entry_count`); each member's ratio is judged against its own compressed size, and
all accepted bytes against the archive's size.
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from worker.archive_caps import (
    ArchiveLimits,
    ExtractReport,
    UnreadableMember,
    check_member_count,
    copy_capped,
)
from worker.archive_names import MemberRefused, member_target, shown_error

_ZIP_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_ZIP_ENCRYPTED = 0x1
_FILE_TYPE_MASK = 0o170000
_REGULAR, _SYMLINK = 0o100000, 0o120000

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


def extract_zip(path: Path, root: Path, report: ExtractReport, limits: ArchiveLimits) -> None:
    """Write the zip's regular files under `root`; refused members go to `report`."""
    check_member_count(limits, zip_entry_count(path, limits.max_members))
    archive_bytes = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for seen, info in enumerate(archive.infolist(), 1):
            check_member_count(limits, seen)
            name = info.filename
            if info.is_dir():
                continue
            try:
                target = member_target(root, name, _zip_refusal(info))
                try:
                    source = archive.open(info)
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
                    raise MemberRefused(f"unreadable member: {shown_error(exc)}") from exc
                with source:
                    copy_capped(
                        source, target, report, limits, name, info.compress_size, archive_bytes
                    )
            except MemberRefused as refusal:
                report.refuse(name, refusal.reason)
            except UnreadableMember as exc:
                report.refuse(name, f"corrupt member: {exc}")
