"""A full store answers 507 with what to do, not a 500 named after an exception
class; a real corpus LMDB with a small map fills up, behind a loopback server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import lmdb
import pytest

import ragcache.corpus.store
from ragcache.api.app import create_app
from ragcache.corpus.jobs import JobRunner
from tests.api.live_server import running_server, tiny_service

SMALL_MAP = 256 * 1024


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[httpx.Client]:
    monkeypatch.setattr(ragcache.corpus.store, "MAP_SIZE", SMALL_MAP)
    with (
        tiny_service(tmp_path / "data") as service,
        running_server(create_app(service)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        yield http


def test_a_full_corpus_store_answers_507_and_keeps_serving(client: httpx.Client) -> None:
    response = client.post("/v1/corpora", json={"name": "big", "description": "x" * SMALL_MAP})
    assert response.status_code == 507, response.text
    error = response.json()["error"]
    assert error["type"] == "insufficient_storage"
    assert "map size" in error["message"] and "delete corpora" in error["message"]
    assert "MapFullError" not in error["message"]
    assert client.post("/v1/corpora", json={"name": "small"}).status_code == 201
    assert [c["name"] for c in client.get("/v1/corpora").json()["data"]] == ["small"]


def test_a_job_that_fills_its_store_fails_with_what_to_do(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "db"), map_size=64 * 1024)

    def fill(progress: object) -> dict[str, object]:
        with env.begin(write=True) as txn:
            txn.put(b"key", b"x" * (1 << 20))
        return {}

    runner = JobRunner()
    try:
        job = runner.wait(runner.submit("ingest", "docs", fill).job_id, timeout=30)
    finally:
        runner.shutdown()
        env.close()
    assert job.status == "failed"
    assert job.error is not None and job.error["type"] == "insufficient_storage"
    assert "map size" in job.error["message"]
