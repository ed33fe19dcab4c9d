"""The training child process: how it is started, watched, asked to stop and killed.

Shared by the single-node runner (worker/runner.py) and the other nodes of a multi-node
job (worker/gang.py): both start the child, call their own check every poll while it
runs, and stop it the same way. A stop is asked for through the child's STOP file (it
checkpoints and exits) and enforced with SIGKILL to its process group once the reason's
grace is over; no child outlives its supervision.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from swav_service.settings import Settings
from worker.fence import FolderLock
from worker.launch import die_with_parent

STORAGE_STOP = "storage_limit_exceeded"
"""The stop reason when the job's checkpoints took its tenant past the stored-bytes limit."""

SHUTDOWN = threading.Event()
"""Set when the worker is asked to stop (SIGTERM): the running job goes back to the queue."""


def start_child(
    run_dir: Path, command: list[str] | None = None, lock: FolderLock | None = None
) -> subprocess.Popen[bytes]:
    """The training process (default: one rank; worker/launch.py builds torchrun's).

    Given the control folder's `lock` (worker/fence.py), the child inherits it; once the
    caller closes its own copy, the lock lasts exactly as long as the child.
    """
    log_file = (run_dir / "train.log").open("ab")
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # see swav_core/cli.py
    try:
        return subprocess.Popen(
            command or [sys.executable, "-m", "worker.train_child", str(run_dir)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a worker killed with -9 leaves no orphan training
            pass_fds=(lock.fd,) if lock is not None else (),
        )
    finally:
        log_file.close()


def kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@dataclass
class Supervision:
    """Why the supervisor asked its child to stop (the first reason wins) and when."""

    control_dir: Path
    reason: str | None = None
    at: float | None = None
    message: str | None = None  # the reason in words, for the job's error

    def request(self, reason: str, message: str | None = None) -> None:
        if self.reason is None:
            self.reason, self.at, self.message = reason, time.monotonic(), message
            (self.control_dir / "STOP").touch()

    def grace_s(self, settings: Settings) -> float:
        """How long the child may take to checkpoint and exit once asked.

        Zero when another runner may already own the job (the lease is expiring, a node
        of the gang is lost, the gang's run ended): its checkpoint could overwrite theirs.
        """
        if self.reason == "shutdown":
            return settings.shutdown_grace_s
        if self.reason in ("cancel", "timeout", STORAGE_STOP):
            return settings.cancel_grace_s
        return 0.0


def supervise(
    child: subprocess.Popen[bytes],
    check: Callable[[], None],
    stop: Supervision,
    settings: Settings,
) -> int:
    """Call `check` every poll until the child exits; its exit code.

    `check` asks for a stop through `stop`, or raises to end the supervision at once
    (e.g. LeaseLost); the child is killed when its grace is over, or as the call ends.
    """
    try:
        while child.poll() is None:
            time.sleep(settings.poll_interval_s)
            check()
            if stop.at is not None and time.monotonic() - stop.at > stop.grace_s(settings):
                kill_group(child, signal.SIGKILL)
    finally:
        if child.poll() is None:
            kill_group(child, signal.SIGKILL)
        child.wait()
    return child.returncode
