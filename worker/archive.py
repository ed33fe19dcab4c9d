"""Safe extraction of an uploaded dataset archive (.zip, .tar, .tar.gz).

Never `extractall`: this Python (3.11.7) predates the 2025 tarfile fixes. Members are
walked one by one; only regular files are written, under names built here from the
member's cleaned path; absolute paths, `..`, symlinks, hardlinks and devices are refused;
the member count, the total uncompressed bytes and the compression ratio are capped
while bytes are counted as they stream. Each refusal is recorded with the member's name
and the reason; nothing is written outside `dest`.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from swav_core.errors import DataError

CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_total_bytes: int
    max_ratio: float


@dataclass
class ExtractReport:
    written: int = 0
    total_bytes: int = 0
    refused: list[dict[str, str]] = field(default_factory=list)

    def refuse(self, member: str, reason: str) -> None:
        self.refused.append({"path": member, "reason": reason})


def archive_kind(path: Path) -> str:
    """'zip' or 'tar' from the file's first bytes, never from its name."""
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise DataError("the upload is not a zip, tar or tar.gz archive")


def safe_member_path(name: str) -> PurePosixPath | None:
    """The relative path to write `name` to, or None if it escapes or is absolute."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name:
        return None
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or ":" in parts[0]:
        return None
    return PurePosixPath(*parts)


def _copy_capped(
    source: IO[bytes],
    target: Path,
    report: ExtractReport,
    limits: ArchiveLimits,
    compressed_size: int,
    member: str,
) -> bool:
    """Stream `source` into `target`, stopping past the caps; False (file removed) if so."""
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if report.total_bytes + written > limits.max_total_bytes:
                raise DataError(
                    f"the archive expands past {limits.max_total_bytes} bytes at {member}: "
                    "upload a smaller dataset"
                )
            if (
                compressed_size
                and written > 1024 * 1024
                and (written / compressed_size > limits.max_ratio)
            ):
                out.close()
                target.unlink()
                report.refuse(member, f"compression ratio above {limits.max_ratio:g}")
                return False
            out.write(chunk)
    report.total_bytes += written
    return True


def _zip_members(
    archive: zipfile.ZipFile,
) -> Iterator[tuple[str, str | None, int, zipfile.ZipInfo]]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        kind = None
        if info.is_dir():
            kind = "dir"
        elif mode and (mode & 0o170000) == 0o120000:
            kind = "symlink"
        elif mode and (mode & 0o170000) not in (0, 0o100000):
            kind = "special file"
        yield info.filename, kind, info.compress_size, info


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> ExtractReport:
    """Extract the regular files of the archive at `path` into `dest` (which must be empty).

    Raises DataError when the archive is unreadable or breaks a global cap (members, total
    bytes); per-member problems are refused and reported instead.
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    report = ExtractReport()
    kind = archive_kind(path)
    try:
        if kind == "zip":
            _extract_zip(path, root, report, limits)
        else:
            _extract_tar(path, root, report, limits)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise DataError(f"the archive is corrupt or truncated: {exc}") from exc
    except DataError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return report


def _target(root: Path, name: str, report: ExtractReport) -> Path | None:
    relative = safe_member_path(name)
    if relative is None:
        report.refuse(name, "absolute path or '..' outside the dataset")
        return None
    target = root.joinpath(*relative.parts)
    if root not in target.parents:
        report.refuse(name, "path outside the dataset")
        return None
    if target.exists():
        report.refuse(name, "duplicate member")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _count(limits: ArchiveLimits, seen: int) -> None:
    if seen > limits.max_members:
        raise DataError(f"the archive has more than {limits.max_members} members")


def _extract_zip(path: Path, root: Path, report: ExtractReport, limits: ArchiveLimits) -> None:
    with zipfile.ZipFile(path) as archive:
        for seen, (name, kind, compressed, info) in enumerate(_zip_members(archive), 1):
            _count(limits, seen)
            if kind == "dir":
                continue
            if kind is not None:
                report.refuse(name, f"{kind} (only regular files are accepted)")
                continue
            target = _target(root, name, report)
            if target is None:
                continue
            with archive.open(info) as source:
                if _copy_capped(source, target, report, limits, compressed, name):
                    report.written += 1


def _extract_tar(path: Path, root: Path, report: ExtractReport, limits: ArchiveLimits) -> None:
    compressed_total = path.stat().st_size
    with tarfile.open(path, mode="r:*") as archive:
        for seen, member in enumerate(archive, 1):
            _count(limits, seen)
            if member.isdir():
                continue
            if member.issym() or member.islnk():
                report.refuse(member.name, "link (only regular files are accepted)")
                continue
            if not member.isreg():
                report.refuse(member.name, "special file (only regular files are accepted)")
                continue
            target = _target(root, member.name, report)
            if target is None:
                continue
            source = archive.extractfile(member)
            if source is None:
                report.refuse(member.name, "unreadable member")
                continue
            with source:
                # tar members are not compressed one by one: use the whole archive's size.
                if _copy_capped(source, target, report, limits, compressed_total, member.name):
                    report.written += 1
            if report.total_bytes / max(compressed_total, 1) > limits.max_ratio and (
                report.total_bytes > 64 * 1024 * 1024
            ):
                raise DataError(
                    f"the archive expands more than {limits.max_ratio:g}x: refused as a bomb"
                )
