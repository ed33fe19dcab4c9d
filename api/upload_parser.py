"""The streaming parser of a dataset upload: the multipart body's `file` part goes straight
to disk as it arrives, the small `name` field to memory.

It is fed python-multipart's callbacks chunk by chunk (`api.routes.datasets` hands it the
request stream), so the archive is never held in memory, and it stops the upload with
the API's error as soon as a rule is broken: an unknown or oversized field, a second file,
a file that is not a supported archive, or more bytes than the cap.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import ApiError
from swav_service.quota import human_bytes

ARCHIVE_EXTENSIONS = (".tar.gz", ".tgz", ".zip", ".tar")  # longest suffix first
MAX_FIELD_BYTES = 1024
FORM_FIELDS = ("file", "name")


def upload_too_large(cap: int) -> ApiError:
    """413 `payload_too_large`: the archive is over the upload cap."""
    return ApiError(
        413,
        "payload_too_large",
        f"the upload exceeds the {human_bytes(cap)} limit ({cap} bytes, SWAV_MAX_UPLOAD_BYTES); "
        "upload a smaller archive",
        "file",
    )


def archive_extension(filename: str) -> str | None:
    """The supported archive suffix `filename` ends with (any case), or None."""
    lowered = filename.lower()
    return next((ext for ext in ARCHIVE_EXTENSIONS if lowered.endswith(ext)), None)


class UploadParser:
    """Streams a multipart/form-data body: the `file` part to disk, small fields to memory.

    Feed it with `write(chunk)`, then call `finish()`. Raises ApiError as soon as the
    body breaks a rule (archive type, size cap, oversized or unknown field), so the caller
    can stop reading. `too_large` is the error for a file over `max_file_bytes` (default:
    413 for the upload cap).
    """

    def __init__(
        self,
        boundary: bytes,
        folder: Path,
        max_file_bytes: int,
        too_large: Callable[[], ApiError] | None = None,
    ) -> None:
        self.folder = folder
        self.max_file_bytes = max_file_bytes
        self.too_large = too_large or partial(upload_too_large, max_file_bytes)
        self.fields: dict[str, bytes] = {}
        self.filename: str | None = None
        self.extension: str | None = None
        self.file_bytes = 0
        self.path: Path | None = None
        self._ended = False
        self._headers: dict[str, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_name: str | None = None
        self._part_value = bytearray()
        self._out: IO[bytes] | None = None
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def write(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise ApiError(
                400, "invalid_multipart", f"the multipart body is malformed: {exc}"
            ) from exc

    def finish(self) -> None:
        self._parser.finalize()
        if not self._ended:
            raise ApiError(
                400, "invalid_multipart", "the multipart body ended before its closing boundary"
            )

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    # python-multipart callbacks ---------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._part_value = bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part_name = name
        if name not in FORM_FIELDS:
            field = name[:100]
            raise ApiError(
                422,
                "invalid_request",
                f"{field}: unknown field; send only `file` and optionally `name`",
                field or None,
            )
        if name != "file":
            return
        if self.filename is not None:
            raise ApiError(422, "invalid_request", "file: send exactly one `file` part", "file")
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self.extension = archive_extension(self.filename)
        if self.extension is None:
            raise ApiError(
                415,
                "unsupported_archive",
                f"file: {Path(self.filename).name[:100]!r} is not a supported archive; "
                f"upload one of {', '.join(ARCHIVE_EXTENSIONS)}",
                "file",
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"upload{self.extension}"
        self._out = open(self.path, "wb")  # noqa: SIM115 (closed in _part_end or close)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == "file" and self._out is not None:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise self.too_large()
            self._out.write(data[start:end])
            return
        self._part_value += data[start:end]
        if len(self._part_value) > MAX_FIELD_BYTES:
            raise ApiError(
                422,
                "invalid_request",
                f"{self._part_name}: form fields are limited to {MAX_FIELD_BYTES} bytes",
                self._part_name or None,
            )

    def _part_end(self) -> None:
        if self._part_name == "file":
            self.close()
        elif self._part_name:
            self.fields[self._part_name] = bytes(self._part_value)

    def _end(self) -> None:
        self._ended = True


def dataset_name(parser: UploadParser) -> str:
    """The `name` field, else the archive's file name without its extension (200 chars)."""
    if "name" in parser.fields:
        name = parser.fields["name"].decode("utf-8", "replace").strip()
    else:
        filename = Path((parser.filename or "").replace("\\", "/")).name
        name = filename[: len(filename) - len(parser.extension or "")].strip()
    if not name:
        name = "dataset"
    if len(name) > 200:
        raise ApiError(422, "invalid_request", "name: at most 200 characters", "name")
    return name
