"""An archive member's name: the path it may be written to, and how it is stored and shown.

Names come from the uploaded archive, so they are hostile until checked here: a member is
written only under a path built from its cleaned name (no absolute path, drive letter,
`..`, backslash or control character), and a name or error message is stored only once
escaped and shortened (`shown_name`, `shown_error`).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path, PurePosixPath

MAX_NAME_BYTES = 1024
MAX_PART_BYTES = 255  # NAME_MAX of Linux file systems
SHOWN_NAME_CHARS = 200


class MemberRefused(Exception):
    """One member is refused; `reason` says why, for the report."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def shown_name(name: str) -> str:
    """`name` made safe to store and show: invalid UTF-8 and control characters escaped,
    at most SHOWN_NAME_CHARS characters."""
    text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(
        c if unicodedata.category(c)[0] != "C" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )
    return text if len(text) <= SHOWN_NAME_CHARS else text[:SHOWN_NAME_CHARS] + "..."


def shown_error(exc: BaseException) -> str:
    """The exception's message, safe to store: no server path (an OSError's file name),
    member names in it escaped as `shown_name` does."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return exc.strerror or type(exc).__name__
    return shown_name(str(exc)) or type(exc).__name__


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


def member_target(root: Path, name: str, refusal: str | None) -> Path:
    """Where member `name` goes under `root`, parent folders created.

    Raises MemberRefused with `refusal` (the reason its kind is not a regular file, from
    the zip or tar reader) when given, else when its path is unsafe or already taken.
    """
    if refusal is not None:
        raise MemberRefused(refusal)
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
