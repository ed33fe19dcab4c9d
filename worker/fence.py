"""Fencing of the training child: the folder lock it holds and the heartbeat it obeys.

The database fences a runner (worker/lease.py: every write checks the fencing token), but
the training child writes files, not rows. Two things keep an old child from writing a
run folder that a new runner now owns:

- The folder lock. A runner takes an exclusive `flock` on its control folder's lock file
  (the run folder itself on a single node and on node 0) before it prepares the folder,
  and hands the locked file to its child, which holds it as long as it lives; the runner
  closes its own copy at once. So a second runner on the same folder waits until the old
  child has exited (`run_lock_wait_s`, renewing its lease), or hands the job back.
- The heartbeat. Each time the runner renews its lease it writes `lease-TOKEN.json`
  with a `stop_by` time: the lease's expiry less half a renewal period. The child's
  watchdog exits at once, writing nothing, when that time has passed, when the file is
  gone (a new runner clears old ones), or when its parent changed (the runner died). A
  runner that stopped renewing (SIGSTOP, a hung thread) thus loses its child before its
  lease expires, so before the reconciler can give the job to anyone else.

Torch-free and service-free: the child (worker/train_child.py) imports it before torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from swav_core.atomic import temp_path

LOCK_FILE = "train.lock"
FENCED_EXIT = 75  # EX_TEMPFAIL: the child stopped because its runner no longer holds the job


class FolderLock:
    """An exclusive `flock` on FOLDER/train.lock, released when every copy of the file
    descriptor is closed (this one and the child's inherited one)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        """Close this copy (again: nothing); a child that inherited the lock keeps it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire_folder_lock(
    folder: Path, wait_s: float, poll_s: float, keep_alive: Callable[[], None]
) -> FolderLock | None:
    """The folder's lock, waiting at most `wait_s` (calling `keep_alive` every poll, e.g.
    to renew the lease); None if another process still holds it by then."""
    lock = FolderLock(folder)
    deadline = time.monotonic() + wait_s
    try:
        while not lock.try_acquire():
            if time.monotonic() >= deadline:
                lock.close()
                return None
            keep_alive()
            time.sleep(poll_s)
    except BaseException:
        lock.close()
        raise
    return lock


def heartbeat_path(control_dir: Path, token: int) -> Path:
    return control_dir / f"lease-{token}.json"


def clear_heartbeats(control_dir: Path) -> None:
    """Remove earlier runs' heartbeats: a child still watching one stops at once."""
    for old in control_dir.glob("lease-*.json"):
        old.unlink(missing_ok=True)


def write_heartbeat(path: Path, lease_remaining_s: float, renew_every_s: float) -> None:
    """Tell the child how long it may run: until half a renewal period before the lease
    expires (the runner itself stops its child a whole period before, if it can)."""
    stop_by = time.time() + lease_remaining_s - renew_every_s / 2
    temporary = temp_path(path)
    temporary.write_text(json.dumps({"stop_by": stop_by}))
    os.replace(temporary, path)


def fenced_because(path: Path, parent_pid: int) -> str | None:
    """Why the child must stop now (its runner no longer holds the job); None if it may go on."""
    if os.getppid() != parent_pid:
        return "its worker process died"
    try:
        stop_by = float(json.loads(path.read_text())["stop_by"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its lease heartbeat {path.name} is gone (another runner owns the folder)"
    if time.time() > stop_by:
        return f"its lease heartbeat {path.name} was not renewed in time"
    return None


def watch_heartbeat(path: Path, every_s: float) -> None:
    """Exit the process (code FENCED_EXIT, writing nothing) once it is fenced: now, or from
    a daemon thread that checks every `every_s`, so a long step cannot delay it."""
    parent = os.getppid()

    def exit_if_fenced() -> None:
        reason = fenced_because(path, parent)
        if reason is not None:
            print(f"train_child {os.getpid()}: fenced, {reason}; exiting", file=sys.stderr)
            sys.stderr.flush()
            os._exit(FENCED_EXIT)

    def loop() -> None:
        while True:
            time.sleep(every_s)
            exit_if_fenced()

    exit_if_fenced()
    threading.Thread(target=loop, name="fence", daemon=True).start()
