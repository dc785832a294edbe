"""Document ids at the edges, against a loopback server: an id with '/' can be
deleted, an id too long for the store is refused at upload, before any work."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragcache.api.app import create_app
from ragcache.corpus.ingest import MAX_DOC_ID_BYTES
from tests.api.live_server import running_server, tiny_service

TEXT = "Four score and seven years ago our fathers brought forth a new nation."


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data: Path = tmp_path_factory.mktemp("ids") / "data"
    with (
        tiny_service(data) as service,
        running_server(create_app(service)) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        assert http.post("/v1/corpora", json={"name": "docs"}).status_code == 201
        yield http


def upload_record(client: httpx.Client, doc_id: str) -> httpx.Response:
    record = json.dumps({"id": doc_id, "text": TEXT}).encode()
    files = [("files", ("records.jsonl", record, "application/jsonl"))]
    return client.post("/v1/corpora/docs/documents", files=files)


def test_a_document_id_with_a_slash_can_be_deleted(client: httpx.Client) -> None:
    response = upload_record(client, "guides/intro")
    assert response.status_code == 202, response.text
    job = response.json()
    deadline = time.monotonic() + 120
    while job["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, "the ingest job did not finish"
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['job_id']}").json()
    assert job["status"] == "succeeded", job
    deleted = client.delete("/v1/corpora/docs/documents/guides/intro")
    assert deleted.status_code == 200 and deleted.json()["deleted"] == "guides/intro"
    assert client.get("/v1/corpora/docs").json()["num_documents"] == 0


def test_a_too_long_document_id_is_refused_before_any_work(client: httpx.Client) -> None:
    response = upload_record(client, "x" * (MAX_DOC_ID_BYTES + 1))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "files" and f"longer than {MAX_DOC_ID_BYTES} bytes" in error["message"]
    assert upload_record(client, "y" * MAX_DOC_ID_BYTES).status_code == 202
