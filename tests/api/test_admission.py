"""Admission control over real HTTP: a tenant over its own limits gets 429, the server
over its global limits 503, both with Retry-After, while other tenants are served."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ragcache.api.admission import Admission
from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service

KEYS = "key-a=alice,key-b=bob"
TEXT = b"The lighthouse keeper trims the wick at dusk and logs every ship that passes."


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    data = tmp_path_factory.mktemp("admission") / "data"
    limits = {
        "api_keys": KEYS,
        "tenant_max_requests_in_flight": 2,
        "max_requests_in_flight": 3,
        "tenant_max_ingest_bytes": 1000,
        "max_queued_ingest_jobs": 1,
    }
    with tiny_service(data, **limits) as rag:
        yield rag


@pytest.fixture(scope="module")
def app(service: RagCache) -> Any:
    return create_app(service)


@pytest.fixture(scope="module")
def base_url(app: Any) -> Iterator[str]:
    with running_server(app) as url:
        yield url


def client(base_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def admission(app: Any) -> Admission:
    return app.state.admission


def slots_released(app: Any, tenant: str) -> bool:
    """A route's slot is given back once its dependency's teardown has run, which can be
    just after the client has read the response."""
    deadline = time.monotonic() + 30
    while admission(app).in_flight(tenant) and time.monotonic() < deadline:
        time.sleep(0.01)
    return admission(app).in_flight(tenant) == 0


def upload(http: httpx.Client, corpus: str, data: bytes) -> httpx.Response:
    return http.post(f"/v1/corpora/{corpus}/documents", files=[("files", ("a.txt", data))])


def test_a_tenant_over_its_request_limit_gets_429_and_others_are_served(
    app: Any, base_url: str
) -> None:
    # Two of alice's requests are being served (her limit).
    admission(app).enter("alice")
    admission(app).enter("alice")
    try:
        with client(base_url, "key-a") as alice, client(base_url, "key-b") as bob:
            refused = alice.get("/v1/corpora")
            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "1"
            assert "tenant_max_requests_in_flight" in refused.json()["error"]["message"]
            assert bob.get("/v1/corpora").status_code == 200
    finally:
        admission(app).leave("alice")
        admission(app).leave("alice")
    with client(base_url, "key-a") as alice:
        assert alice.get("/v1/corpora").status_code == 200
    assert slots_released(app, "alice")


def test_the_server_over_its_global_limit_gets_503(app: Any, base_url: str) -> None:
    for tenant in ("carol", "dave", "erin"):
        admission(app).enter(tenant)
    try:
        with client(base_url, "key-b") as bob:
            refused = bob.get("/v1/corpora")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"] == "1"
            assert "max_requests_in_flight" in refused.json()["error"]["message"]
            assert httpx.get(f"{base_url}/health").status_code == 200
    finally:
        for tenant in ("carol", "dave", "erin"):
            admission(app).leave(tenant)


def wait_for_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_ingest_bytes_per_tenant_and_the_global_job_queue_are_bounded(
    app: Any, base_url: str, service: RagCache
) -> None:
    with client(base_url, "key-a") as alice, client(base_url, "key-b") as bob:
        for http in (alice, bob):
            assert http.post("/v1/corpora", json={"name": "notes"}).status_code == 201
        too_big = upload(alice, "notes", TEXT * 20)
        assert too_big.status_code == 429
        assert too_big.headers["Retry-After"] == "5"
        assert "tenant_max_ingest_bytes=1000" in too_big.json()["error"]["message"]

        # A job that waits on the test holds the one queue place.
        release = threading.Event()
        blocker = service.jobs.submit("ingest", "notes", lambda progress: release.wait(60) and {})
        admission(app).hold_ingest("", blocker.job_id, 0, service)
        try:
            full = upload(bob, "notes", TEXT)
            assert full.status_code == 503
            assert full.headers["Retry-After"] == "5"
            assert "max_queued_ingest_jobs" in full.json()["error"]["message"]
        finally:
            release.set()
        deadline = time.monotonic() + 60
        while not service.jobs.get(blocker.job_id).finished:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        accepted = upload(bob, "notes", TEXT)
        assert accepted.status_code == 202
        assert wait_for_job(bob, accepted.json()["job_id"])["status"] == "succeeded"
    assert admission(app).refused == {429: 1 + 1, 503: 1 + 1}
