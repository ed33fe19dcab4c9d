"""What the broker holds: the messages waiting in a queue and those read but not acked.

The reconciler compares them with the database to find work whose message was lost (a
Redis restart without persistence). Messages are counted per (task name, first argument),
the row id every task of the service takes.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from swav_service.dispatch import producer
from swav_service.settings import Settings

TaskCounts = Counter[tuple[str, str]]


def _task_args(message: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """(task name, positional args) of a Celery protocol-2 message as kombu stores it."""
    headers = message.get("headers") or {}
    body = message.get("body")
    args: list[Any] = []
    if isinstance(body, str):
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        try:
            decoded = json.loads(body)
            args = list(decoded[0]) if isinstance(decoded, list) and decoded else []
        except (ValueError, TypeError):
            args = []
    return headers.get("task"), args


def _counts(messages: Iterable[dict[str, Any]]) -> TaskCounts:
    """How many messages each (task, id) has among `messages`."""
    counts: TaskCounts = Counter()
    for message in messages:
        task, args = _task_args(message)
        if task and args:
            counts[(task, str(args[0]))] += 1
    return counts


def _decoded(raw: Iterable[Any]) -> list[dict[str, Any]]:
    messages = [json.loads(m) if isinstance(m, (bytes, str)) else m for m in raw]
    return [m for m in messages if isinstance(m, dict)]


def broker_messages(settings: Settings, queue: str) -> tuple[TaskCounts, TaskCounts]:
    """Messages per (task, id): (waiting in `queue` or a sized queue `queue.gpusN`, unacked
    by any worker). Celery's filesystem transport keeps every queue in one folder and has
    no unacked set: there, every message waiting anywhere is counted."""
    if settings.broker_url is None:
        folder = settings.broker_folder / "queue"
        messages = []
        for path in folder.glob("*.msg"):
            try:
                messages.append(json.loads(path.read_bytes()))
            except (OSError, ValueError):
                continue
        return _counts(messages), Counter()
    with producer().connection_for_read() as connection:
        client = connection.default_channel.client
        queues = [queue, *client.scan_iter(match=f"{queue}.gpus*")]
        waiting = [m for name in queues for m in client.lrange(name, 0, -1)]
        unacked = [json.loads(v)[0] if isinstance(v, (bytes, str)) else v
                   for v in client.hvals("unacked")]
    return _counts(_decoded(waiting)), _counts(_decoded(unacked))
