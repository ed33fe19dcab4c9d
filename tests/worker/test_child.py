"""The supervision loop shared by the runner and the nodes of a gang (worker/child.py):
a stop is asked for through STOP, enforced after the reason's grace, and no process of
the child's group outlives the supervision."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swav_service.settings import Settings
from worker.child import Supervision, start_child, supervise
from worker.lease import LeaseLost

# Exits 0 once STOP appears (as train_child does after its checkpoint); IGNORING never does.
OBEYS = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.02)\n"
IGNORING = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
# Starts a grandchild in the same process group, writes its pid, then waits.
WITH_GRANDCHILD = (
    "import subprocess, sys, time\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "open(sys.argv[1], 'w').write(str(p.pid))\ntime.sleep(600)\n"
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, poll_interval_s=0.02, cancel_grace_s=30.0,
                    shutdown_grace_s=30.0)


def child_running(script: str, folder: Path, argument: str = "STOP") -> subprocess.Popen[bytes]:
    return start_child(folder, [sys.executable, "-c", script, str(folder / argument)])


def test_a_child_that_checkpoints_on_stop_exits_cleanly(tmp_path: Path, settings: Settings) -> None:
    child = child_running(OBEYS, tmp_path)
    stop = Supervision(tmp_path)
    assert supervise(child, lambda: stop.request("cancel"), stop, settings) == 0
    assert (tmp_path / "STOP").exists() and stop.reason == "cancel"


@pytest.mark.parametrize("reason", ["lease_expiring", "rank_lost", "run_ended"])
def test_a_child_that_may_race_a_new_owner_is_killed_at_once(
    tmp_path: Path, settings: Settings, reason: str
) -> None:
    """No grace where another runner may own the job: its checkpoint could overwrite theirs
    (the 30 s grace of the fixture would be the test's duration otherwise)."""
    child = child_running(IGNORING, tmp_path)
    stop = Supervision(tmp_path)
    assert supervise(child, lambda: stop.request(reason), stop, settings) == -signal.SIGKILL


def test_the_first_reason_wins(tmp_path: Path) -> None:
    stop = Supervision(tmp_path)
    stop.request("shutdown")
    at = stop.at
    stop.request("cancel")
    assert (stop.reason, stop.at) == ("shutdown", at)


@pytest.mark.parametrize(("reason", "grace"), [
    ("shutdown", 7.0), ("cancel", 3.0), ("timeout", 3.0), ("lease_expiring", 0.0),
    ("rank_lost", 0.0), ("run_ended", 0.0),
])
def test_grace_per_reason(tmp_path: Path, reason: str, grace: float) -> None:
    stop = Supervision(tmp_path)
    stop.request(reason)
    assert stop.grace_s(Settings(data_dir=tmp_path, shutdown_grace_s=7, cancel_grace_s=3)) == grace


def test_a_child_that_ignores_stop_is_killed_after_its_grace(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, poll_interval_s=0.02, cancel_grace_s=0.2)
    child = child_running(IGNORING, tmp_path)
    stop = Supervision(tmp_path)
    assert supervise(child, lambda: stop.request("cancel"), stop, settings) == -signal.SIGKILL


def test_a_lost_lease_ends_supervision_with_the_whole_group_killed(
    tmp_path: Path, settings: Settings
) -> None:
    child = child_running(WITH_GRANDCHILD, tmp_path, "grandchild")

    def check() -> None:
        if (tmp_path / "grandchild").exists():
            raise LeaseLost("job")

    with pytest.raises(LeaseLost):
        supervise(child, check, Supervision(tmp_path), settings)
    assert child.returncode == -signal.SIGKILL
    grandchild = int((tmp_path / "grandchild").read_text())
    assert process_ended(grandchild), f"grandchild {grandchild} outlived the supervision"


def process_ended(pid: int, polls: int = 500) -> bool:
    """Whether `pid` is gone or a zombie (killed, left for init to reap) within the polls."""
    for _ in range(polls):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.01)
    return False
