"""A job's event log: JSON pages and the live stream.

Over real HTTP, on the module's API (tests/api/conftest.py); what a worker would write
is written into its database directly (tests/api/helpers.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from swav_service.job_state import append_event, change_status
from tests.api.conftest import assert_error
from tests.api.helpers import (
    add_dataset,
    create_job,
    db,
)
from tests.conftest import Service


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_POLL_INTERVAL_S": "0.05"}

# --------------------------------------------------------------------------- events


def read_sse(response: httpx.Response) -> Iterator[tuple[dict[str, str], float]]:
    """(fields of one SSE message, arrival time) until the server ends the stream."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line == "":
            if fields:
                yield fields, time.monotonic()
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value


def test_events_pages(api: Service, client: httpx.Client) -> None:
    job_id = create_job(client, add_dataset(api))["id"]
    with db(api) as session:
        for step in range(1, 7):
            append_event(session, job_id, "metrics", {"step": step})
    seqs, after = [], None
    while True:
        params = {"limit": 3} | ({"after": after} if after else {})
        page = client.get(f"/v1/jobs/{job_id}/events", params=params).json()
        seqs.append([e["seq"] for e in page["data"]])
        after = page["next_cursor"]
        if after is None:
            break
    assert seqs == [[1, 2, 3], [4, 5, 6], [7]]
    page = client.get(f"/v1/jobs/{job_id}/events", params={"after": 5}).json()
    assert [e["data"] for e in page["data"]] == [{"step": 5}, {"step": 6}]
    assert set(page["data"][0]) == {"seq", "type", "data", "created_at"}
    response = client.get(f"/v1/jobs/{job_id}/events", params={"after": -1})
    assert_error(response, 422, "invalid_request", "after")


def test_event_stream(api: Service, client: httpx.Client) -> None:
    job_id = create_job(client, add_dataset(api))["id"]  # event 1: state queued
    finished_at: list[float] = []

    def worker() -> None:
        for step in range(1, 6):  # events 2..6
            time.sleep(0.1)
            with db(api) as session:
                append_event(session, job_id, "metrics", {"step": step})
        with db(api) as session:  # event 7
            assert change_status(session, job_id, "succeeded", expected=("queued",))
        finished_at.append(time.monotonic())

    thread = threading.Thread(target=worker)
    headers = {"Accept": "text/event-stream"}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        thread.start()
        received = list(read_sse(response))  # returns only because the server ends it
    thread.join()

    messages = [m for m, _ in received]
    assert [int(m["id"]) for m in messages] == list(range(1, 8))
    assert [m["event"] for m in messages] == ["state"] + ["metrics"] * 5 + ["state"]
    data = [json.loads(m["data"]) for m in messages]
    assert [d["seq"] for d in data] == list(range(1, 8))
    assert [d["data"].get("step") for d in data[1:6]] == [1, 2, 3, 4, 5]
    assert data[-1]["data"] == {"status": "succeeded"}
    assert received[1][1] < finished_at[0]  # live: the first metric came before the end

    # Reconnecting with Last-Event-ID resumes after it (and wins over `after`).
    headers["Last-Event-ID"] = "4"
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, params={"after": 1}
    ) as response:
        assert [int(m["id"]) for m, _ in read_sse(response)] == [5, 6, 7]
    with client.stream(
        "GET",
        f"/v1/jobs/{job_id}/events",
        headers={"Accept": "text/event-stream"},
        params={"after": 6},
    ) as response:
        assert [m["event"] for m, _ in read_sse(response)] == ["state"]
