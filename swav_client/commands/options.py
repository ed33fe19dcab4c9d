"""What every `swav` subcommand shares: the root options (server, key, `--json`, timeout)
and the client built from them, the common option types, the exit statuses, and the
report of the client's errors."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated, ParamSpec, TypeVar, cast

import typer

from swav_client import display
from swav_client.client import SwavClient
from swav_client.errors import ApiError, SwavClientError
from swav_client.session import DEFAULT_URL

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Options:
    url: str
    api_key: str | None
    json: bool
    timeout: float

    def client(self) -> SwavClient:
        return SwavClient(self.url, api_key=self.api_key, timeout=self.timeout)


JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON (errors too, on stderr).")
]
Limit = Annotated[int | None, typer.Option(help="At most this many (server default 50).")]
Cursor = Annotated[str | None, typer.Option(help="`next_cursor` of the previous page.")]

P = ParamSpec("P")
T = TypeVar("T")


def options(ctx: typer.Context, json_output: bool) -> Options:
    """The root options, with a command's own `--json` (`swav jobs list --json`) merged."""
    found: Options = ctx.find_object(Options) or Options(DEFAULT_URL, None, False, 60.0)
    return replace(found, json=True) if json_output else found


def reports_errors(command: Callable[P, T]) -> Callable[P, T]:
    """Turn the client's errors into a message on stderr (with --json, the API's error
    envelope) and exit status 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return command(*args, **kwargs)
        except SwavClientError as exc:
            # Every command takes ctx and json_output, which typer passes by keyword.
            ctx = kwargs.get("ctx")
            as_json = bool(kwargs.get("json_output")) or (
                ctx is not None and options(cast(typer.Context, ctx), False).json
            )
            if as_json:
                display.err.print_json(json.dumps(exc.envelope()))
            elif isinstance(exc, ApiError):
                display.print_error(f"{exc.status} {exc.code}: {exc.message}")
            else:
                display.print_error(str(exc))
            raise typer.Exit(EXIT_FAILED) from None

    return run
