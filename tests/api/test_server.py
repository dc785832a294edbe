"""End to end against a real uvicorn server on 127.0.0.1: corpora, uploads, jobs, queries."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from ragcache.api.app import create_app
from ragcache.config import ServerConfig
from ragcache.service import RagCache
from tests.service_helpers import SAMPLES, free_port, minilm, tiny_config, tiny_loaded

QUESTION = "What did Lincoln say at Gettysburg about the nation?"
UPLOAD_LIMIT = 20_000


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    config = tiny_config(tmp_path_factory.mktemp("server") / "data")
    config.service.kv_precompute = "lazy"
    config.server.max_upload_bytes = UPLOAD_LIMIT
    with RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag:
        yield rag


@pytest.fixture(scope="module")
def client(service: RagCache) -> Iterator[httpx.Client]:
    app = create_app(service)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        yield http
    server.should_exit = True
    thread.join(timeout=30)


def upload(client: httpx.Client, corpus: str, *files: tuple[str, bytes]) -> httpx.Response:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return client.post(f"/v1/corpora/{corpus}/documents", files=parts)


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {job}"
        time.sleep(0.1)


def sample(name: str) -> tuple[str, bytes]:
    return name, (SAMPLES / name).read_bytes()


@pytest.fixture(scope="module")
def docs(client: httpx.Client) -> str:
    assert client.post("/v1/corpora", json={"name": "docs"}).status_code == 201
    response = upload(
        client, "docs", sample("gettysburg_address.md"), sample("tale_of_two_cities_opening.txt")
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert len(job["result"]["added"]) == 2 and job["stage"] == "commit"
    return "docs"


def corpus_state(client: httpx.Client, name: str) -> dict[str, Any]:
    response = client.get(f"/v1/corpora/{name}")
    assert response.status_code == 200
    return response.json()


def test_health(client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"


def test_upload_then_query_reports_chunk_cache_hits_the_second_time(
    client: httpx.Client, docs: str
) -> None:
    assert corpus_state(client, docs)["num_documents"] == 2
    body = {"query": QUESTION, "corpus": docs, "k": 2, "max_tokens": 6}
    first = client.post("/v1/query", json=body)
    second = client.post("/v1/query", json=body)
    assert first.status_code == second.status_code == 200, first.text
    first_result, second_result = first.json(), second.json()
    assert first_result["sources"][0]["source"].endswith("gettysburg_address.md")
    assert first_result["answer"] == second_result["answer"]
    assert first_result["cache"]["computed_tokens"] > 0
    assert first_result["cache"]["tokens_by_tier"] == {}
    assert second_result["cache"]["computed_tokens"] == 0
    assert second_result["cache"]["tokens_by_tier"]["host"] > 0
    print(
        f"ttft cold {first_result['timings']['ttft'] * 1000:.1f} ms, "
        f"warm {second_result['timings']['ttft'] * 1000:.1f} ms"
    )


def test_streamed_query_sends_tokens_then_the_result(client: httpx.Client, docs: str) -> None:
    body = {"query": QUESTION, "corpus": docs, "k": 2, "max_tokens": 5, "stream": True}
    events: list[tuple[str, str]] = []
    with client.stream("POST", "/v1/query", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = "message"
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((event, line[len("data: ") :]))
                event = "message"
    kinds = [kind for kind, _ in events]
    assert kinds[-2:] == ["result", "message"] and events[-1][1] == "[DONE]"
    result = json.loads(events[-2][1])
    streamed = "".join(json.loads(data)["text"] for kind, data in events if kind == "token")
    assert streamed == result["answer"] and result["completion_tokens"] >= 1


def test_retrieve_returns_ranked_sources(client: httpx.Client, docs: str) -> None:
    response = client.post("/v1/retrieve", json={"query": QUESTION, "corpus": docs, "k": 2})
    sources = response.json()["sources"]
    assert len(sources) == 2 and sources[0]["score"] >= sources[1]["score"]


BAD_REQUESTS: dict[str, tuple[str, str, dict[str, Any], int, str | None]] = {
    "query unknown corpus": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "nope"}},
        404,
        "corpus",
    ),
    "query k zero": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "k": 0}},
        422,
        "k",
    ),
    "query k not int": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "k": "many"}},
        422,
        "k",
    ),
    "query k true": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "k": True}},
        422,
        "k",
    ),
    "query unknown field": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "temprature": 1}},
        422,
        "temprature",
    ),
    "query bad method": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "method": "magic"}},
        422,
        "method",
    ),
    "query bad focus order": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "method": "cachefocus", "focus_order": "x"}},
        422,
        "focus_order",
    ),
    "query bad top_p": (
        "POST",
        "/v1/query",
        {"json": {"query": "q", "corpus": "docs", "top_p": 0}},
        422,
        "top_p",
    ),
    "query too long": (
        "POST",
        "/v1/query",
        {"json": {"query": "liberty and union " * 2000, "corpus": "docs"}},
        400,
        "k",
    ),
    "retrieve empty": (
        "POST",
        "/v1/retrieve",
        {"json": {"query": "", "corpus": "docs"}},
        422,
        "query",
    ),
    "corpus bad name": ("POST", "/v1/corpora", {"json": {"name": "../etc"}}, 422, "name"),
    "corpus exists": ("POST", "/v1/corpora", {"json": {"name": "docs"}}, 409, "name"),
    "unknown job": ("GET", "/v1/jobs/job-nope", {}, 404, "id"),
    "unknown document": ("DELETE", "/v1/corpora/docs/documents/nope", {}, 404, "doc_id"),
    "unknown corpus": ("GET", "/v1/corpora/nope", {}, 404, "corpus"),
}

BAD_UPLOADS: dict[str, tuple[str, list[tuple[str, bytes]], int, str]] = {
    "upload unknown corpus": ("nope", [sample("gettysburg_address.md")], 404, "corpus"),
    "upload empty document": ("docs", [("empty.txt", b" \n\t ")], 400, "files"),
    "upload undecodable": ("docs", [("bad.txt", b"\xff\xfe\x00\x9c")], 400, "files"),
    "upload unsupported": ("docs", [("tool.exe", b"MZ\x90\x00")], 415, "files"),
    "upload oversize": ("docs", [("big.txt", b"liberty " * (UPLOAD_LIMIT // 8 + 1))], 413, "files"),
    "upload good and bad": (
        "docs",
        [sample("declaration_of_independence.txt"), ("empty.md", b"")],
        400,
        "files",
    ),
}


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_json_errors_and_change_nothing(
    client: httpx.Client, docs: str, case: str
) -> None:
    method, path, kwargs, status, param = BAD_REQUESTS[case]
    before = corpus_state(client, docs)
    assert_error(client.request(method, path, **kwargs), status, param)
    assert corpus_state(client, docs) == before


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_json_errors_and_change_nothing(
    client: httpx.Client, docs: str, case: str
) -> None:
    corpus, files, status, param = BAD_UPLOADS[case]
    before = corpus_state(client, docs)
    assert_error(upload(client, corpus, *files), status, param)
    assert corpus_state(client, docs) == before


def test_upload_without_files_is_refused(client: httpx.Client, docs: str) -> None:
    response = client.post(f"/v1/corpora/{docs}/documents", data={"note": "no files"})
    assert_error(response, 400, "files")


def test_cache_stats_clear_and_deletes(client: httpx.Client, service: RagCache) -> None:
    assert client.post("/v1/corpora", json={"name": "scratch"}).status_code == 201
    job = upload(client, "scratch", sample("pride_and_prejudice_chapter1.html")).json()
    assert wait_for_job(client, job["job_id"])["status"] == "succeeded"
    assert (
        client.post(
            "/v1/query", json={"query": "Netherfield", "corpus": "scratch", "max_tokens": 2}
        ).status_code
        == 200
    )
    stats = client.get("/v1/cache/stats").json()
    assert stats["chunks"]["tiers"]["host"]["entries"] > 0
    assert client.post("/v1/cache/clear").json()["entries_removed"] > 0
    assert client.get("/v1/cache/stats").json()["chunks"]["tiers"]["host"]["entries"] == 0
    doc_id = corpus_state(client, "scratch")["documents"][0]["doc_id"]
    assert client.delete(f"/v1/corpora/scratch/documents/{doc_id}").status_code == 200
    assert corpus_state(client, "scratch")["num_documents"] == 0
    assert client.delete("/v1/corpora/scratch").status_code == 200
    assert_error(client.get("/v1/corpora/scratch"), 404, "corpus")
    names = [c["name"] for c in client.get("/v1/corpora").json()["data"]]
    assert "scratch" not in names and "docs" in names


def test_api_keys_are_required_when_configured(service: RagCache) -> None:
    app = create_app(service, ServerConfig(api_keys="secret=team-a"))
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        assert_error(http.get("/v1/corpora"), 401, None)
        wrong = http.get("/v1/corpora", headers={"Authorization": "Bearer wrong"})
        assert_error(wrong, 401, None)
        right = http.get("/v1/corpora", headers={"Authorization": "Bearer secret"})
        assert right.status_code == 200
