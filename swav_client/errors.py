"""What the client raises: the server's error envelope, or why no answer came back."""

from __future__ import annotations


class SwavClientError(Exception):
    """Base of every error the client raises on purpose; `code` names the kind."""

    code = "client_error"

    def envelope(self) -> dict[str, dict[str, str | None]]:
        """The error in the API's envelope, for `--json` output."""
        return {"error": {"code": self.code, "message": str(self), "param": None}}


class ApiError(SwavClientError):
    """The server answered with an error: `{"error": {"code", "message", "param"}}`.

    `code` is the server's stable code (`not_found`, `invalid_config`, ...); answers that
    are not the service's envelope (a proxy's 502 page) get `http_<status>`.
    `retry_after` is the Retry-After header in seconds, when the server sent one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"code": self.code, "message": self.message, "param": self.param}}


class ServerUnreachable(SwavClientError):
    """No answer: the connection failed, timed out or broke (after any retries)."""

    code = "server_unreachable"


class ChecksumMismatch(SwavClientError):
    """A download's sha256 differs from the one the server announced; nothing was kept."""

    code = "checksum_mismatch"


class NotUploadable(SwavClientError, ValueError):
    """The path is not an archive the API takes, or a folder with no files; nothing sent."""

    code = "not_uploadable"


class FolderChanged(SwavClientError):
    """A file of a folder being uploaded changed size while it was streamed."""

    code = "folder_changed"
