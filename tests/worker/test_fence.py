"""The training child's fencing (worker/fence.py), with real processes: the folder lock
lives exactly as long as the child, and a child whose runner stopped renewing (or died)
exits by itself, code FENCED_EXIT, writing nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT
from worker.child import start_child
from worker.fence import (
    FENCED_EXIT,
    FolderLock,
    acquire_folder_lock,
    heartbeat_path,
    write_heartbeat,
)

# Obeys the heartbeat argv[1], says it is running in argv[2], then would sleep for a minute.
WATCHING = (
    "import sys, time\nfrom pathlib import Path\nfrom worker.fence import watch_heartbeat\n"
    "watch_heartbeat(Path(sys.argv[1]), 0.05)\nPath(sys.argv[2]).write_text('running')\n"
    "time.sleep(60)\n"
)


def python(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *args], env=env, **kwargs)  # type: ignore[call-overload]


def alive(pid: int) -> bool:
    """Running, or stopped: not gone and not a zombie waiting for a reaper."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_the_lock_passes_to_the_child_and_ends_with_it(tmp_path: Path) -> None:
    lock = acquire_folder_lock(tmp_path, 0.0, 0.01, lambda: None)
    assert lock is not None
    child = start_child(tmp_path, [sys.executable, "-c", "import time; time.sleep(60)"], lock)
    lock.close()  # as the runner does: only the child holds it now
    kept_alive: list[float] = []
    assert acquire_folder_lock(tmp_path, 0.3, 0.05, lambda: kept_alive.append(1)) is None
    assert len(kept_alive) >= 3  # the waiting runner renewed its lease meanwhile
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    second = acquire_folder_lock(tmp_path, 5.0, 0.05, lambda: None)
    assert second is not None
    second.close()


def test_a_child_stops_by_itself_once_its_heartbeat_is_not_renewed(tmp_path: Path) -> None:
    heartbeat = heartbeat_path(tmp_path, 7)
    write_heartbeat(heartbeat, lease_remaining_s=2.0, renew_every_s=1.0)  # stop by now + 1.5 s
    child = python("-c", WATCHING, str(heartbeat), str(tmp_path / "marker"))
    assert child.wait(timeout=30) == FENCED_EXIT
    assert (tmp_path / "marker").read_text() == "running"  # it ran while the beat was fresh


def test_a_renewed_heartbeat_keeps_the_child_running(tmp_path: Path) -> None:
    heartbeat = heartbeat_path(tmp_path, 7)
    write_heartbeat(heartbeat, lease_remaining_s=0.6, renew_every_s=0.2)
    child = python("-c", WATCHING, str(heartbeat), str(tmp_path / "marker"))
    try:
        until = time.monotonic() + 2.0  # four times the beat's own life
        while time.monotonic() < until:
            write_heartbeat(heartbeat, lease_remaining_s=0.6, renew_every_s=0.2)
            time.sleep(0.1)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_a_child_whose_heartbeat_was_cleared_writes_nothing(tmp_path: Path) -> None:
    """A new runner cleared the old heartbeat: the real train_child exits before it reads
    its config or writes an event or an outcome."""
    spec = {"config": {}, "data_dir": str(tmp_path),
            "fence": {"heartbeat": str(heartbeat_path(tmp_path, 3)), "every_s": 0.05}}
    (tmp_path / "job.json").write_text(json.dumps(spec))
    child = python("-m", "worker.train_child", str(tmp_path), stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=60)
    assert child.returncode == FENCED_EXIT
    assert b"fenced" in err and b"lease-3.json is gone" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_a_child_whose_worker_died_stops(tmp_path: Path) -> None:
    """The parent exits without killing it (no PR_SET_PDEATHSIG here): the watchdog sees
    the new parent and stops the orphan."""
    heartbeat = heartbeat_path(tmp_path, 1)
    write_heartbeat(heartbeat, lease_remaining_s=600.0, renew_every_s=1.0)
    parent = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {WATCHING!r}, sys.argv[1], sys.argv[2]])\n"
        "open(sys.argv[3], 'w').write(str(p.pid))\n"
        "import time, pathlib\n"
        "while not pathlib.Path(sys.argv[2]).exists(): time.sleep(0.02)\n"
    )
    pid_file = tmp_path / "pid"
    python("-c", parent, str(heartbeat), str(tmp_path / "marker"), str(pid_file)).wait(30)
    orphan = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and alive(orphan):
        time.sleep(0.05)
    assert not alive(orphan), "the orphaned child kept running"


def test_a_folder_lock_is_exclusive_between_open_files(tmp_path: Path) -> None:
    first, second = FolderLock(tmp_path), FolderLock(tmp_path)
    assert first.try_acquire() and not second.try_acquire()
    first.close()
    first.close()  # a second close does nothing (the fd number may be someone else's now)
    assert second.try_acquire()
    second.close()
