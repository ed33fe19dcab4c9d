"""A parser for server-sent events (the WHATWG `text/event-stream` format)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # "message" when the server names none
    data: str
    id: str | None


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Events from the stream's lines (without their line ends).

    A blank line ends an event; `data` lines are joined with newlines; lines starting
    with ':' (keep-alives) and unknown fields are ignored, as the specification says.
    """
    event, last_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\x00" not in value:
            last_id = value
