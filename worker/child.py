"""The training child process: how it is started, signalled and asked to stop.

Shared by the single-node runner and the node ranks of a multi-node job (worker/gang.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker.launch import die_with_parent

SHUTDOWN = threading.Event()
"""Set when the worker is asked to stop (SIGTERM): the running job goes back to the queue."""


def start_child(run_dir: Path, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """The training process (default: one rank; worker/launch.py builds torchrun's)."""
    log_file = (run_dir / "train.log").open("ab")
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # see swav_core/cli.py
    return subprocess.Popen(
        command or [sys.executable, "-m", "worker.train_child", str(run_dir)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,  # a worker killed with -9 leaves no orphan training
    )


def kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@dataclass
class Supervision:
    """Why the runner asked its child to stop (first reason wins) and when."""

    reason: str | None = None
    at: float | None = None

    def request(self, reason: str, run_dir: Path) -> None:
        if self.reason is None:
            self.reason, self.at = reason, time.monotonic()
            (run_dir / "STOP").touch()

