"""Safe extraction of an uploaded dataset archive (.zip, .tar, .tar.gz, .tar.bz2, .tar.xz).

Never `extractall`: this Python (3.11.7) predates the 2025 tarfile fixes. Members are
walked one by one (`worker/archive_zip.py`, `worker/archive_tar.py`); only regular files
are written, under names built from the member's cleaned path (`worker/archive_names.py`);
absolute paths, drive letters, `..`, backslashes, control characters, symlinks, hardlinks,
devices, fifos, sparse and encrypted members are refused. The member count, the total
uncompressed bytes and the compression ratio are capped on bytes counted as they stream,
never on the sizes that headers declare (`worker/archive_caps.py`). Each refusal is
recorded with the member's name (as the archive spells it) and the reason; a broken global
cap refuses the whole archive (`ArchiveRefused`). Nothing is written outside `dest`.

The archive kind comes from its first bytes, never from the upload's name.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

from worker.archive_caps import ArchiveLimits, ArchiveRefused, ExtractReport, UnreadableMember
from worker.archive_names import shown_error
from worker.archive_tar import extract_tar
from worker.archive_zip import extract_zip


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
            extract_zip(path, root, report, limits)
        else:
            extract_tar(path, root, report, limits)
    except ArchiveRefused as error:
        shutil.rmtree(root, ignore_errors=True)
        error.refused = report.refused + error.refused
        raise
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, EOFError,
            NotImplementedError, ValueError, struct.error, UnreadableMember) as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise ArchiveRefused(
            f"the archive is corrupt or truncated: {shown_error(exc)}", report.refused
        ) from exc
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return report
