"""Event streams hold no database connection, are capped per tenant, and end when their
key is revoked (api/routes/events.py), against a real API on PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
from sqlalchemy.orm import Session

from swav_service.models import Dataset, new_id
from tests.api.conftest import Deployment, assert_error
from tests.api.helpers import wait_until

MAX_STREAMS = 40  # above the API's PostgreSQL pool (10 + 20 overflow, swav_service/db.py)


@pytest.fixture(scope="module")
def api_env() -> dict[str, str]:
    return {"SWAV_TENANT_MAX_STREAMS": str(MAX_STREAMS), "SWAV_POLL_INTERVAL_S": "0.2"}


def queued_job(deployment: Deployment, client: httpx.Client, tenant: str) -> str:
    """A job that stays queued (no worker runs here): its stream never ends by itself."""
    dataset_id = new_id("ds")
    with Session(deployment.engine) as session, session.begin():
        session.add(Dataset(id=dataset_id, tenant=tenant, name="d", status="ready",
                            num_images=64, num_skipped=0))
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "preset": "cpu-tiny"})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


class OpenStream:
    """An event stream read in a thread on a connection of its own: `first` is set once
    its first event arrives, `ended` once the server ends it; `close` hangs up."""

    def __init__(self, client: httpx.Client, job_id: str) -> None:
        self.first, self.ended = threading.Event(), threading.Event()
        self.status: int | None = None
        self._client = httpx.Client(base_url=client.base_url, headers=client.headers,
                                    timeout=httpx.Timeout(60, read=None))
        self._thread = threading.Thread(target=self._read, args=(job_id,), daemon=True)
        self._thread.start()

    def _read(self, job_id: str) -> None:
        with contextlib.suppress(httpx.HTTPError, RuntimeError), self._client.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}
        ) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.first.set()
            self.ended.set()

    def close(self) -> None:
        self._client.close()



def test_more_streams_than_database_connections_leave_the_api_responsive(
    deployment: Deployment, tenant: tuple[str, httpx.Client]
) -> None:
    name, client = tenant
    job_id = queued_job(deployment, client, name)
    streams = [OpenStream(client, job_id) for _ in range(35)]
    try:
        for stream in streams:
            assert stream.first.wait(60), "a stream got no first event"
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{job_id}", timeout=10)
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 5  # no wait for a pooled connection
    finally:
        for stream in streams:
            stream.close()


def test_a_tenant_past_its_stream_limit_gets_429_and_a_freed_slot_back(
    deployment: Deployment, tenant: tuple[str, httpx.Client]
) -> None:
    name, client = tenant
    job_id = queued_job(deployment, client, name)
    streams = [OpenStream(client, job_id) for _ in range(MAX_STREAMS)]
    try:
        for stream in streams:
            assert stream.first.wait(60)
        refused = client.get(f"/v1/jobs/{job_id}/events",
                             headers={"Accept": "text/event-stream"})
        message = assert_error(refused, 429, "too_many_streams")
        assert "SWAV_TENANT_MAX_STREAMS" in message and refused.headers["Retry-After"] == "5"
        other_name, other = deployment.new_tenant()  # another tenant is not affected
        with other:
            other_stream = OpenStream(other, queued_job(deployment, other, other_name))
            assert other_stream.first.wait(30) and other_stream.status == 200
            other_stream.close()
        streams.pop().close()  # the server frees the slot once it sees the hang-up
        retried: list[OpenStream] = []

        def reopened() -> bool:
            if retried and retried[-1].status is None:
                return False  # still waiting for this attempt's answer
            if retried and retried[-1].status == 200:
                return True
            retried.append(OpenStream(client, job_id))
            return False

        wait_until(reopened, 30, "a stream to open once one closed")
        assert retried[-1].first.wait(30)
        streams.extend(retried)
    finally:
        for stream in streams:
            stream.close()


def test_a_stream_ends_when_its_key_is_revoked(deployment: Deployment) -> None:
    name = f"t-{new_id('x')[-8:]}"
    key = deployment.service.create_key(name)
    with deployment.service.client(key=key) as client:
        stream = OpenStream(client, queued_job(deployment, client, name))
        assert stream.first.wait(30) and not stream.ended.is_set()
        revoked = deployment.service.cli("revoke-key", key[:13])
        assert revoked.returncode == 0, revoked.stderr
        assert stream.ended.wait(30), "the stream outlived its key"
