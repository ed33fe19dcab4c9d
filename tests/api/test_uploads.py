"""Hostile uploads: archives and images built here to escape, explode or lie.

The first half calls `extract_archive` and `scan_image_folder` directly on archives and
files generated in each test. The second half sends uploads over real HTTP to a live API
and a live short-queue Celery worker (PostgreSQL + Redis, small caps set through SWAV_*
variables): each bad member or image is refused or skipped with its reason in the
dataset's report, nothing is written outside the dataset's folder, and the service stays
healthy.
"""

from __future__ import annotations

import io
import secrets
import stat
import struct
import tarfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from swav_core.image_folder import NoImagesError, scan_image_folder
from tests.conftest import Service, create_database, drop_database, migrate, service_env
from worker.archive import extract_archive
from worker.archive_caps import ArchiveLimits, ArchiveRefused
from worker.archive_zip import zip_entry_count

MiB = 1 << 20
LIMITS = ArchiveLimits(max_members=100, max_total_bytes=64 * MiB, max_ratio=50.0)
TOKEN = secrets.token_hex(4)  # in the names of escaping members, to find any that landed
ESCAPE = f"swav-escape-{TOKEN}.png"
LINK_REFUSED = "symlink (only regular files are accepted)"
DOTDOT = "'..' in the path"
ABSOLUTE = "absolute path"


# --------------------------------------------------------------------------- generated inputs


def png_bytes(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg(in_header: bool = False) -> bytes:
    """A 32 x 32 JPEG cut inside its tables (`in_header`) or in its entropy-coded data."""
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    scan_start = data.index(b"\xff\xda")  # start of scan: the tables end here
    return data[: scan_start // 2] if in_header else data[: (scan_start + len(data)) // 2]


def png_bomb() -> bytes:
    """45 bytes: PNG signature, an IHDR declaring 100000 x 100000 RGB pixels, an empty IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    assert len(data) == 45
    return data


# A member: (name, kind, data); kind is file, dir, symlink, hardlink, fifo, chardev or
# blockdev; for links `data` is the target.
Member = tuple[str, str, bytes]

_ZIP_TYPES = {"symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR,
              "blockdev": stat.S_IFBLK}
_TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
              "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
              "chardev": tarfile.CHRTYPE, "blockdev": tarfile.BLKTYPE}


def zip_of(members: list[Member], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding `members` with their names exactly as given."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name" is the point
        for name, kind, data in members:
            info = zipfile.ZipInfo(name.rstrip("/") + "/" if kind == "dir" else name)
            info.compress_type = method
            if kind in _ZIP_TYPES:
                info.external_attr = (_ZIP_TYPES[kind] | 0o777) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def tar_of(members: list[Member], compression: str = "gz") -> bytes:
    """A tar (gzip-compressed unless `compression` is "") holding `members` as given."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as archive:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = _TAR_TYPES[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = data.decode()
                archive.addfile(info)
            elif kind == "file":
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def archive_of(kind: str, members: list[Member]) -> bytes:
    return zip_of(members) if kind == "zip" else tar_of(members, "gz" if kind == "tar.gz" else "")


def all_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}


def extract(tmp_path: Path, kind: str, data: bytes, limits: ArchiveLimits = LIMITS) -> Any:
    """Extract `data` into tmp_path/out; returns (report, refused as {path: reason})."""
    path = tmp_path / f"upload.{kind}"
    path.write_bytes(data)
    report = extract_archive(path, tmp_path / "out", limits)
    refused = {r["path"]: r["reason"] for r in report.refused}
    assert len(refused) == len(report.refused)
    return report, refused


def assert_nothing_escaped(tmp_path: Path, expected_inside: set[str]) -> None:
    """Only the upload and the expected files under out/ exist; no escaping name anywhere."""
    uploads = {p.name for p in tmp_path.glob("upload.*")}
    assert all_files(tmp_path) == uploads | {f"out/{name}" for name in expected_inside}
    assert not list(tmp_path.parent.rglob(f"*{TOKEN}*"))
    assert not list(Path("/tmp").glob(f"*{TOKEN}*"))  # where the absolute members point


# --------------------------------------------------------------------------- extract_archive


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_escaping_names_are_refused(tmp_path: Path, kind: str) -> None:
    members: list[Member] = [
        ("cats/a.png", "file", b"a"),
        (f"../{ESCAPE}", "file", b"x"),
        (f"cats/../../{ESCAPE}", "file", b"x"),
        (f"/tmp/{ESCAPE}", "file", b"x"),
        (f"//tmp/{ESCAPE}", "file", b"x"),
        (f"C:/{ESCAPE}", "file", b"x"),
        (f"..\\{ESCAPE}", "file", b"x"),
        (f"cats/bell\x07-{TOKEN}.png", "file", b"x"),
        ("cats/" + "n" * 300 + ".png", "file", b"x"),
        ("../outside-dir", "dir", b""),
        ("./cats/./b.png", "file", b"b"),
    ]
    report, refused = extract(tmp_path, kind, archive_of(kind, members))
    assert refused == {
        f"../{ESCAPE}": DOTDOT,
        f"cats/../../{ESCAPE}": DOTDOT,
        f"/tmp/{ESCAPE}": ABSOLUTE,
        f"//tmp/{ESCAPE}": ABSOLUTE,
        f"C:/{ESCAPE}": "drive letter or device in the name",
        f"..\\{ESCAPE}": "backslash in the name (Windows path)",
        f"cats/bell\\x07-{TOKEN}.png": "control character in the name",
        "cats/" + "n" * 195 + "...": "name too long",
    }
    assert report.written == 2 and report.total_bytes == 2
    assert_nothing_escaped(tmp_path, {"cats/a.png", "cats/b.png"})


def test_tar_pax_and_undecodable_names_are_checked_too(tmp_path: Path) -> None:
    """Names from pax records (which may hold NUL) and raw bytes that are not UTF-8."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as archive:
        info = tarfile.TarInfo("caf\udce9.png")  # the byte 0xe9 alone: latin-1, not UTF-8
        archive.addfile(info, io.BytesIO(b""))
    buffer.seek(0)
    with tarfile.open(fileobj=buffer, mode="a", format=tarfile.PAX_FORMAT) as archive:
        for path in (f"nul\x00{TOKEN}.png", f"../{ESCAPE}", "ok.png"):
            info = tarfile.TarInfo("placeholder.png")
            info.pax_headers = {"path": path}
            archive.addfile(info, io.BytesIO(b""))
    _, refused = extract(tmp_path, "tar", buffer.getvalue())
    assert refused == {
        "caf\\udce9.png": "name is not valid UTF-8",
        f"nul\\x00{TOKEN}.png": "control character in the name",
        f"../{ESCAPE}": DOTDOT,
    }
    assert_nothing_escaped(tmp_path, {"ok.png"})


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_links_and_special_files_are_refused(tmp_path: Path, kind: str) -> None:
    """A link to /tmp followed by a member "through" it writes into a plain folder."""
    members: list[Member] = [
        ("escape", "symlink", b"/tmp"),
        (f"escape/{ESCAPE}", "file", b"through the link"),
        ("passwd.png", "symlink", b"/etc/passwd"),
        ("pipe", "fifo", b""),
        ("null", "chardev", b""),
        ("sda", "blockdev", b""),
    ]
    if kind != "zip":  # zip has no hardlinks
        members.append(("hard.png", "hardlink", b"/etc/passwd"))
    _, refused = extract(tmp_path, kind, archive_of(kind, members))
    special = "special file" if kind == "zip" else None
    expected = {
        "escape": LINK_REFUSED,
        "passwd.png": LINK_REFUSED,
        "pipe": f"{special or 'fifo'} (only regular files are accepted)",
        "null": f"{special or 'device'} (only regular files are accepted)",
        "sda": f"{special or 'device'} (only regular files are accepted)",
    }
    if kind != "zip":
        expected["hard.png"] = "hardlink (only regular files are accepted)"
    assert refused == expected
    inside = tmp_path / "out" / "escape"
    assert inside.is_dir() and not inside.is_symlink()
    # The member is written under its own name inside the dataset, never through a link.
    (tmp_path / "out" / "escape" / ESCAPE).rename(tmp_path / "out" / "escape" / "through.png")
    assert_nothing_escaped(tmp_path, {"escape/through.png"})


def test_zip_encrypted_and_unknown_method_members_are_refused(tmp_path: Path) -> None:
    data = bytearray(zip_of([("locked.png", "file", b"x"), ("odd.png", "file", b"y"),
                             ("ok.png", "file", b"z")], method=zipfile.ZIP_STORED))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        infos = archive.infolist()
    # Patch the central directory: general-purpose flag bit 0 (encrypted) on the first
    # entry, compression method 97 on the second.
    directory = data.index(b"PK\x01\x02")
    data[directory + 8] |= 0x01
    second = data.index(b"PK\x01\x02", directory + 4)
    data[second + 10 : second + 12] = struct.pack("<H", 97)
    assert infos[0].filename == "locked.png"
    _, refused = extract(tmp_path, "zip", bytes(data))
    assert refused == {"locked.png": "encrypted member",
                       "odd.png": "unsupported compression method 97"}
    assert_nothing_escaped(tmp_path, {"ok.png"})


def test_corrupt_zip_member_is_refused_alone(tmp_path: Path) -> None:
    data = bytearray(zip_of([("bad.png", "file", b"A" * 100), ("ok.png", "file", b"fine")],
                            method=zipfile.ZIP_STORED))
    data[data.index(b"A" * 100)] = ord("B")  # the stored bytes no longer match the CRC
    _, refused = extract(tmp_path, "zip", bytes(data))
    assert refused == {"bad.png": "corrupt member: Bad CRC-32 for file 'bad.png'"}
    assert_nothing_escaped(tmp_path, {"ok.png"})


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_duplicate_and_conflicting_names(tmp_path: Path, kind: str) -> None:
    members: list[Member] = [
        ("a.png", "file", b"first"),
        ("a.png", "file", b"second"),
        ("./a.png", "file", b"third"),
        ("a.png/b.png", "file", b"under a file"),
        ("d/x.png", "file", b"x"),
        ("d", "file", b"a file where a folder is"),
    ]
    report, _ = extract(tmp_path, kind, archive_of(kind, members))
    duplicate = "duplicate member (an earlier member has this path)"
    assert report.refused == [
        {"path": "a.png", "reason": duplicate},
        {"path": "./a.png", "reason": duplicate},
        {"path": "a.png/b.png", "reason": "a parent folder is a file of an earlier member"},
        {"path": "d", "reason": duplicate},
    ]
    assert (tmp_path / "out" / "a.png").read_bytes() == b"first"
    assert_nothing_escaped(tmp_path, {"a.png", "d/x.png"})


def write(tmp_path: Path, kind: str, data: bytes) -> Path:
    path = tmp_path / f"upload.{kind}"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_past_the_total_cap_refuses_the_archive(tmp_path: Path, kind: str) -> None:
    """3 MiB of zeros (a few KiB compressed) against a 2 MiB cap; the ratio cap is off."""
    limits = ArchiveLimits(max_members=100, max_total_bytes=2 * MiB, max_ratio=1e9)
    members: list[Member] = [("../first.png", "file", b"x"), ("bomb.bin", "file", bytes(3 * MiB))]
    data = archive_of(kind, members)
    assert len(data) < 20_000
    path = write(tmp_path, kind, data)
    expected = "expands past 2097152 bytes at member 'bomb.bin'"
    with pytest.raises(ArchiveRefused, match=expected) as info:
        extract_archive(path, tmp_path / "out", limits)
    assert info.value.refused == [{"path": "../first.png", "reason": DOTDOT}]
    assert info.value.code == "invalid_data"
    assert all_files(tmp_path) == {path.name}  # the partial output was removed


def test_compression_ratio_cap(tmp_path: Path) -> None:
    """Ratios count once past the first MiB written (RATIO_GRACE_BYTES); the cap here is 50.

    zip: a member expanding more is refused alone; many members each under the grace are
    caught by the ratio of the whole archive. tar.gz: members are not compressed one by
    one, so the ratio is the whole decompressed stream's.
    """
    zeros = bytes(2 * MiB)  # deflate reaches ~1000x on zeros
    for folder in ("member", "many", "tar"):
        (tmp_path / folder).mkdir()
    _, refused = extract(tmp_path / "member", "zip", zip_of(
        [("zeros.bin", "file", zeros), ("small.bin", "file", bytes(100_000)),
         ("ok.png", "file", png_bytes(1))]))
    assert refused == {"zeros.bin": "compression ratio above 50 (SWAV_MAX_COMPRESSION_RATIO)"}
    assert all_files(tmp_path / "member" / "out") == {"small.bin", "ok.png"}

    many = [(f"{i}.bin", "file", bytes(600_000)) for i in range(4)]
    path = write(tmp_path / "many", "zip", zip_of(many))
    with pytest.raises(ArchiveRefused, match="more than 50 times its size at member '1.bin'"):
        extract_archive(path, tmp_path / "many" / "out", LIMITS)

    path = write(tmp_path / "tar", "tar.gz", tar_of([("zeros.bin", "file", zeros)]))
    with pytest.raises(ArchiveRefused, match="50 times its size at member 'zeros.bin'"):
        extract_archive(path, tmp_path / "tar" / "out", LIMITS)
    assert not (tmp_path / "tar" / "out").exists() and not (tmp_path / "many" / "out").exists()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_member_count_cap(tmp_path: Path, kind: str) -> None:
    limits = ArchiveLimits(max_members=10, max_total_bytes=MiB, max_ratio=50)
    members: list[Member] = [(f"{i}.png", "file", b"x") for i in range(11)]
    path = write(tmp_path, kind, archive_of(kind, members))
    with pytest.raises(ArchiveRefused, match="more than 10 members"):
        extract_archive(path, tmp_path / "out", limits)
    report = extract_archive(write(tmp_path, kind, archive_of(kind, members[:10])),
                             tmp_path / "out", limits)
    assert report.written == 10


def test_zip_entry_count_reads_the_central_directory(tmp_path: Path) -> None:
    """Counted without building ZipInfo objects, also with a comment or data in front."""
    members: list[Member] = [(f"{i}.png", "file", b"x" * i) for i in range(7)]
    buffer = io.BytesIO()
    buffer.write(b"#!self-extractor stub\n" * 10)
    with zipfile.ZipFile(buffer, "a") as archive:
        archive.comment = b"PK comment"
        for name, _, data in members:
            archive.writestr(name, data)
    path = write(tmp_path, "zip", buffer.getvalue())
    assert zip_entry_count(path, stop_after=100) == 7
    assert zip_entry_count(path, stop_after=3) == 4
    assert extract_archive(path, tmp_path / "out", LIMITS).written == 7
    (tmp_path / "text.zip").write_text("not a zip")
    assert zip_entry_count(tmp_path / "text.zip", stop_after=10) == 0


def test_oversized_tar_extended_header_is_refused(tmp_path: Path) -> None:
    """A pax header declaring 512 MiB would be read into memory whole by tarfile."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 512 * MiB
    raw = header.tobuf(format=tarfile.USTAR_FORMAT) + bytes(4096)
    path = write(tmp_path, "tar", raw)
    with pytest.raises(ArchiveRefused, match="extended header declares 536870912 bytes"):
        extract_archive(path, tmp_path / "out", LIMITS)


def test_not_an_archive_or_truncated(tmp_path: Path) -> None:
    path = write(tmp_path, "zip", b"a text file named .zip")
    with pytest.raises(ArchiveRefused, match="not a zip, tar"):
        extract_archive(path, tmp_path / "out", LIMITS)
    whole = tar_of([("a.png", "file", png_bytes(1) * 50)])
    path = write(tmp_path, "tar.gz", whole[: len(whole) // 2])
    with pytest.raises(ArchiveRefused, match="corrupt or truncated"):
        extract_archive(path, tmp_path / "out", LIMITS)
    assert all_files(tmp_path) == {"upload.zip", "upload.tar.gz"}


# --------------------------------------------------------------------------- scan_image_folder


def test_images_are_judged_by_decoding(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    files = {
        "good.png": png_bytes(1),
        "png-named.jpg": png_bytes(2),  # the extension lies; the content is a PNG
        "bomb.png": png_bomb(),
        "truncated.jpg": truncated_jpeg(),
        "cut-header.jpg": truncated_jpeg(in_header=True),
        "text.jpg": b"a text file named .jpg\n",
        "big.png": png_bytes(3, size=80),  # 6400 pixels: over the 4096 below
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    scan = scan_image_folder(root, max_pixels=4096)
    assert scan.files == ("good.png", "png-named.jpg")
    assert {s.path: s.reason for s in scan.skipped} == {
        "big.png": "decompression bomb",
        "bomb.png": "decompression bomb",
        "cut-header.jpg": "truncated image",
        "text.jpg": "not an image",
        "truncated.jpg": "truncated image",
    }
    # Default: Pillow's own limit, far above 80 x 80 and far below 100000 x 100000.
    default = scan_image_folder(root)
    assert "big.png" in default.files and "bomb.png" not in default.files


def test_no_readable_image_names_no_server_path(tmp_path: Path) -> None:
    root = tmp_path / "server-side-folder"
    root.mkdir()
    (root / "text.jpg").write_text("text")
    (root / "bomb.png").write_bytes(png_bomb())
    with pytest.raises(NoImagesError) as info:
        scan_image_folder(root)
    message = str(info.value)
    assert message.startswith("no readable image: 2 files skipped")
    assert str(tmp_path) not in message and "server-side-folder" not in message
    assert {s.path: s.reason for s in info.value.skipped} == {
        "bomb.png": "decompression bomb", "text.jpg": "not an image"}


# --------------------------------------------------------------------------- over HTTP

CAPS = {
    "SWAV_MAX_UPLOAD_BYTES": 256 * 1024,
    "SWAV_MAX_UNCOMPRESSED_BYTES": 2 * MiB,
    "SWAV_MAX_ARCHIVE_MEMBERS": 64,
    "SWAV_MAX_COMPRESSION_RATIO": 2000,  # above deflate's ~1000x: zip bombs hit the byte cap
    "SWAV_MAX_DATASET_IMAGE_PIXELS": 4096,
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API + one worker on a fresh PostgreSQL database, with small caps.

    The short queue has a name of its own: other test sessions share this Redis, and a
    worker of theirs on a plain `short` queue would take these uploads (and ours, theirs).
    """
    data_dir = tmp_path_factory.mktemp("uploads") / "data"
    data_dir.mkdir()
    url = create_database()
    redis_db = 1 + int(secrets.token_hex(1), 16) % 14
    env = service_env(data_dir, url, f"redis://127.0.0.1:6379/{redis_db}")
    env.update({name: str(value) for name, value in CAPS.items()})
    env["SWAV_SHORT_QUEUE"] = f"short-uploads-{TOKEN}"
    service = Service(env, data_dir)
    try:
        migrate(env)
        service.start_api()
        service.start_worker(env["SWAV_SHORT_QUEUE"])
        yield service
    finally:
        service.stop()
        drop_database(url)


def upload(service: Service, filename: str, data: bytes, content_type: str) -> dict[str, Any]:
    """POST the archive and wait until the worker has settled it (ready or failed)."""
    with service.client() as client:
        response = client.post("/v1/datasets", files={"file": (filename, data, content_type)})
        assert response.status_code == 202, response.text
        dataset_id = response.json()["id"]
        deadline = time.time() + 90
        while time.time() < deadline:
            body = client.get(f"/v1/datasets/{dataset_id}").json()
            if body["status"] != "validating":
                return dict(body)
            time.sleep(0.2)
    raise AssertionError(f"dataset {dataset_id} still validating\n{service.logs()}")


def dataset_folder(service: Service, dataset_id: str) -> Path:
    return service.data_dir / "artifacts" / "datasets" / dataset_id


def assert_contained_and_healthy(service: Service) -> None:
    """No escaping member landed anywhere; the API answers and the worker is alive."""
    assert not list(service.data_dir.parent.parent.rglob(f"*{TOKEN}*"))
    assert not list(Path("/tmp").glob(f"*{TOKEN}*"))  # where the absolute members point
    for folder in (service.data_dir / "artifacts" / "datasets").iterdir():
        names = {p.name for p in folder.iterdir()}
        assert names <= {"upload.zip", "upload.tar.gz", "images", "prepared"}
    with service.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
    assert all(p.poll() is None for p in service.processes), service.logs()


def test_zip_with_hostile_members_and_images(service: Service) -> None:
    """One zip: good images (one PNG named .jpg) beside every kind of bad member."""
    members: list[Member] = [
        ("shapes/cats/a.png", "file", png_bytes(1)),
        ("shapes/cats/b.png", "file", png_bytes(2)),
        ("shapes/dogs/c.png", "file", png_bytes(3)),
        ("shapes/dogs/png-named.jpg", "file", png_bytes(4)),
        (f"../{ESCAPE}", "file", png_bytes(5)),
        (f"shapes/../../{ESCAPE}", "file", png_bytes(5)),
        (f"/tmp/{ESCAPE}", "file", png_bytes(5)),
        (f"C:\\{ESCAPE}", "file", png_bytes(5)),
        ("shapes/link.png", "symlink", b"/etc/passwd"),
        ("shapes/cats/bomb.png", "file", png_bomb()),
        ("shapes/cats/big.png", "file", png_bytes(6, size=80)),
        ("shapes/dogs/truncated.jpg", "file", truncated_jpeg()),
        ("shapes/dogs/text.jpg", "file", b"a text file named .jpg\n"),
    ]
    data = zip_of(members)
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:  # bzip2 takes zeros far past 2000x
        archive.writestr("shapes/zeros.bin", bytes(MiB + MiB // 2), zipfile.ZIP_BZIP2)
    body = upload(service, "shapes.zip", buffer.getvalue(), "image/png")  # the type is ignored
    assert body["status"] == "ready", body
    assert body["num_images"] == 4 and body["classes"] == ["cats", "dogs"]
    assert body["skipped"] == [
        {"path": f"../{ESCAPE}", "reason": DOTDOT},
        {"path": f"shapes/../../{ESCAPE}", "reason": DOTDOT},
        {"path": f"/tmp/{ESCAPE}", "reason": ABSOLUTE},
        {"path": f"C:\\{ESCAPE}", "reason": "backslash in the name (Windows path)"},
        {"path": "shapes/link.png", "reason": LINK_REFUSED},
        {"path": "shapes/zeros.bin",
         "reason": "compression ratio above 2000 (SWAV_MAX_COMPRESSION_RATIO)"},
        {"path": "shapes/cats/big.png", "reason": "decompression bomb"},
        {"path": "shapes/cats/bomb.png", "reason": "decompression bomb"},
        {"path": "shapes/dogs/text.jpg", "reason": "not an image"},
        {"path": "shapes/dogs/truncated.jpg", "reason": "truncated image"},
    ]
    assert body["num_skipped"] == 10
    images = dataset_folder(service, body["id"]) / "images"
    assert all_files(images) == {"cats/a.png", "cats/b.png", "dogs/c.png", "dogs/png-named.jpg",
                                 "cats/bomb.png", "cats/big.png", "dogs/truncated.jpg",
                                 "dogs/text.jpg"}
    assert_contained_and_healthy(service)


def test_tar_gz_with_links_devices_and_escapes(service: Service) -> None:
    members: list[Member] = [
        ("shapes/cats/a.png", "file", png_bytes(1)),
        ("shapes/dogs/c.png", "file", png_bytes(3)),
        (f"../{ESCAPE}", "file", b"x"),
        (f"/tmp/{ESCAPE}", "file", b"x"),
        ("shapes/escape", "symlink", b"/tmp"),
        (f"shapes/escape/{ESCAPE}", "file", b"x"),  # through the link, if it existed
        ("shapes/hard.png", "hardlink", b"/etc/passwd"),
        ("shapes/pipe", "fifo", b""),
        ("shapes/null", "chardev", b""),
    ]
    body = upload(service, "shapes.tar.gz", tar_of(members), "application/zip")
    assert body["status"] == "ready", body
    assert body["num_images"] == 2
    skipped = {s["path"]: s["reason"] for s in body["skipped"]}
    assert skipped == {
        f"../{ESCAPE}": DOTDOT,
        f"/tmp/{ESCAPE}": ABSOLUTE,
        "shapes/escape": LINK_REFUSED,
        "shapes/hard.png": "hardlink (only regular files are accepted)",
        "shapes/pipe": "fifo (only regular files are accepted)",
        "shapes/null": "device (only regular files are accepted)",
        f"shapes/escape/{ESCAPE}": "not an image",  # written inside, as a plain folder
    }
    landed = dataset_folder(service, body["id"]) / "images" / "escape" / ESCAPE
    assert landed.is_file() and not landed.parent.is_symlink()
    landed.unlink()
    assert_contained_and_healthy(service)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_bomb_fails_the_dataset_with_the_member_and_reason(service: Service, kind: str) -> None:
    members: list[Member] = [("shapes/a.png", "file", png_bytes(1)),
                             (f"../{ESCAPE}", "file", b"x"),
                             ("shapes/bomb.bin", "file", bytes(3 * MiB))]
    data = archive_of(kind, members)
    assert len(data) < 20_000
    body = upload(service, f"bomb.{kind}", data, "application/octet-stream")
    assert body["status"] == "failed"
    assert body["error"] == {
        "code": "invalid_data",
        "message": "the archive expands past 2097152 bytes at member 'shapes/bomb.bin' "
        "(SWAV_MAX_UNCOMPRESSED_BYTES): refused as a decompression bomb; upload a smaller "
        "dataset",
    }
    assert body["skipped"] == [{"path": f"../{ESCAPE}", "reason": DOTDOT}]
    assert {p.name for p in dataset_folder(service, body["id"]).iterdir()} == {
        f"upload.{kind}"}  # nothing extracted is kept
    assert_contained_and_healthy(service)


def test_no_readable_image_fails_without_server_paths(service: Service) -> None:
    data = zip_of([("junk/readme.jpg", "file", b"text"), ("junk/bomb.png", "file", png_bomb()),
                   ("junk/empty.png", "file", b"")])
    body = upload(service, "junk.zip", data, "application/zip")
    assert body["status"] == "failed" and body["error"]["code"] == "invalid_data"
    message = body["error"]["message"]
    assert message == (
        "no readable image: 3 files skipped, top reasons: decompression bomb (1), "
        "empty file (1), not an image (1); accepted formats are JPEG, PNG, WEBP, BMP and GIF"
    )
    assert body["skipped"] == [
        {"path": "junk/bomb.png", "reason": "decompression bomb"},
        {"path": "junk/empty.png", "reason": "empty file"},
        {"path": "junk/readme.jpg", "reason": "not an image"},
    ]
    assert_contained_and_healthy(service)


def test_body_past_the_byte_cap_is_413(service: Service) -> None:
    cap = CAPS["SWAV_MAX_UPLOAD_BYTES"]
    data = zip_of([(f"{i}.png", "file", png_bytes(i, size=64)) for i in range(40)])
    assert len(data) > cap
    before = set((service.data_dir / "artifacts" / "datasets").iterdir())
    with service.client() as client:
        response = client.post("/v1/datasets", files={"file": ("big.zip", data)})

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as the bytes stream in
            body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.zip\""
                    b"\r\n\r\n" + data + b"\r\n--b--\r\n")
            for start in range(0, len(body), 16_384):
                yield body[start : start + 16_384]

        streamed = client.post("/v1/datasets", content=chunks(),
                               headers={"Content-Type": "multipart/form-data; boundary=b"})
    for answer in (response, streamed):
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "payload_too_large"
        assert answer.json()["error"]["param"] == "file"
    assert set((service.data_dir / "artifacts" / "datasets").iterdir()) == before
    assert_contained_and_healthy(service)
