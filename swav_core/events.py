"""Training events: dicts with a "type" sent to callbacks and appended to events.jsonl.

Kinds: dataset, started, resumed, budget_fitted, metrics, epoch, checkpoint, warning,
collapse_recovery, stopped, finished. Only rank 0 emits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

EventCallback = Callable[[dict[str, Any]], None]


class EventSink:
    """Sends events to the callbacks and appends them to events.jsonl, on rank 0 only."""

    def __init__(self, run_dir: Path, callbacks: Sequence[EventCallback], enabled: bool) -> None:
        self.path = run_dir / "events.jsonl"
        self.callbacks = callbacks
        self.enabled = enabled

    def __call__(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        event = {"type": kind, "time": time.time(), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        for callback in self.callbacks:
            callback(event)
