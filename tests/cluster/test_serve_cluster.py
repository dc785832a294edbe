"""Two generator replicas on Ray Serve (loopback) sharing a real redis-server: a chunk one
replica encodes is served to the other from Redis, the router follows the chunks, the
frontend serves the single server's routes with its API keys, and a corpus uploaded
through one replica is answered by the other."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragcache.cluster.asgi_call import ForwardedRequest
from ragcache.cluster.corpus_import import import_corpora
from ragcache.cluster.corpus_log import open_corpus_log
from ragcache.cluster.redis_server import LocalRedis
from ragcache.service.rag_cache import RagCache
from tests.service_helpers import SAMPLES, free_port, tiny_config

# The default test run collects this module without needing Ray installed.
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
deployments = pytest.importorskip("ragcache.cluster.deployments")

pytestmark = pytest.mark.cluster

STATS_PERIOD_S = 0.2
HTTP_PORT = free_port()
BASE = f"http://127.0.0.1:{HTTP_PORT}"
ALICE = {"Authorization": "Bearer key-alice"}
CORPUS_NAMESPACE = f"corpora-{uuid.uuid4().hex[:8]}"


def passages(count: int) -> list[str]:
    texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLES.iterdir())]
    pieces = [text[start : start + 300] for text in texts for start in (0, 400, 800)]
    return [piece for piece in pieces if piece.strip()][:count]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, LocalRedis, Path]]:
    root = tmp_path_factory.mktemp("cluster")
    with RagCache(config=tiny_config(root / "corpus")) as ingest:
        ingest.create_corpus("samples")
        ingest.ingest([str(SAMPLES)], "samples")
    redis_server = LocalRedis().start()
    log = open_corpus_log(redis_server.url, CORPUS_NAMESPACE, 384, 0.5)
    assert import_corpora(root / "corpus", log) == ["samples"]
    assert import_corpora(root / "corpus", log) == []  # seeding again adds nothing
    config = tiny_config(root / "unused")
    config.chunkstore.remote_url = redis_server.url
    config.chunkstore.remote_namespace = f"cluster-{uuid.uuid4().hex[:8]}"
    config.chunkstore.cost_model = "default"  # no prefill timing in every new replica
    config.server.api_keys = "key-alice=alice,key-bob=bob"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    spec = deployments.ClusterSpec(
        config,
        str(root / "replicas"),
        generators=2,
        corpus_namespace=CORPUS_NAMESPACE,
        corpus_follow_s=0.5,
        stats_period_s=STATS_PERIOD_S,
        generator_cpus=1.0,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        handle = serve.run(deployments.build_app(spec), name="ragcache", route_prefix="/")
        yield handle, redis_server, root / "replicas"
    finally:
        serve.shutdown()
        ray.shutdown()
        redis_server.close()


def answer(handle: object, documents: list[str]) -> dict:
    result = handle.answer.remote(documents, "What is this about?", max_tokens=2).result()  # type: ignore[attr-defined]
    time.sleep(8 * STATS_PERIOD_S)  # the router sees the replicas' new memory
    return result


def test_a_chunk_encoded_by_one_replica_is_read_by_the_other_from_redis(cluster: tuple) -> None:
    handle, _, _ = cluster
    texts = passages(5)
    first_set, second_set = texts[:2], texts[2:]

    cold = answer(handle, first_set)
    assert cold["chunk_tiers"] == [None, None]
    first_replica = cold["replica"]

    other = answer(handle, second_set)
    assert other["replica"] != first_replica, "new content goes to the replica holding less"
    second_replica = other["replica"]

    warm = answer(handle, first_set)
    assert warm["replica"] == first_replica
    assert warm["chunk_tiers"] == ["host", "host"]

    # Three of four chunks sit in the second replica's memory: it gets the request and
    # reads the first replica's chunk from Redis instead of computing it.
    mixed = answer(handle, [first_set[0], *second_set])
    assert mixed["replica"] == second_replica
    assert mixed["chunk_tiers"] == ["remote", "host", "host", "host"]
    assert mixed["usage"]["computed_tokens"] == 0
    assert mixed["usage"]["tokens_by_tier"]["remote"] > 0


def test_query_retrieves_from_the_corpus_store_and_answers(cluster: tuple) -> None:
    handle, _, _ = cluster
    result = handle.query.remote(
        "four score and seven years", "samples", k=2, max_tokens=2
    ).result()
    assert len(result["sources"]) == 2
    assert len(result["chunk_tiers"]) == 2
    assert result["completion_tokens"] == 2


def test_the_frontend_serves_the_single_server_routes_with_its_keys(cluster: tuple) -> None:
    assert httpx.get(f"{BASE}/health", timeout=60).status_code == 200
    assert httpx.get(f"{BASE}/v1/models", timeout=60).status_code == 401
    models = httpx.get(f"{BASE}/v1/models", headers=ALICE, timeout=60)
    assert models.status_code == 200, models.text
    model = models.json()["data"][0]["id"]
    chat = httpx.post(
        f"{BASE}/v1/chat/completions",
        headers=ALICE,
        json={
            "model": model,
            "messages": [{"role": "user", "content": "Who wrote it?"}],
            "documents": passages(2),
            "max_tokens": 2,
        },
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] == 2
    bad = httpx.post(f"{BASE}/v1/query", headers=ALICE, json={"corpus": "x"}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["param"]
    # alice's corpora are hers: the default tenant's "samples" is not visible to her
    hidden = httpx.post(
        f"{BASE}/v1/query", headers=ALICE, json={"query": "who?", "corpus": "samples"}, timeout=60
    )
    assert hidden.status_code == 404


def replica_ids(root: Path) -> list[str]:
    return sorted(path.name.removeprefix("replica-") for path in root.glob("replica-*"))


def on_replica(
    replica: str, method: str, path: str, body: dict | None = None
) -> tuple[int, dict, str]:
    """Sends one HTTP request to the named generator replica (the router honours a pin)."""
    generation = serve.get_deployment_handle("Generation", "ragcache")
    headers = [(b"authorization", b"Bearer key-alice"), (b"content-type", b"application/json")]
    encoded = b"" if body is None else json.dumps(body).encode()
    request = ForwardedRequest(method, path, b"", headers, encoded, pinned_replica=replica)
    pieces = list(generation.options(stream=True).http.remote(request))
    start = pieces[0]
    found = {k.decode(): v.decode() for k, v in start["headers"]}
    assert found["x-ragcache-replica"] == replica
    return start["status"], found, b"".join(pieces[1:]).decode()


def test_a_corpus_uploaded_through_one_replica_is_answered_by_the_other(cluster: tuple) -> None:
    _, _, root = cluster
    created = httpx.post(f"{BASE}/v1/corpora", headers=ALICE, json={"name": "notes"}, timeout=60)
    assert created.status_code == 201, created.text
    files = [
        ("files", (f"note{i}.txt", text.encode(), "text/plain"))
        for i, text in enumerate(passages(3))
    ]
    upload = httpx.post(
        f"{BASE}/v1/corpora/notes/documents", headers=ALICE, files=files, timeout=120
    )
    assert upload.status_code == 202, upload.text
    uploader = upload.headers["x-ragcache-replica"]
    job = upload.json()["job_id"]
    deadline = time.monotonic() + 120
    while True:  # job polls go back to the replica running the job
        status = httpx.get(f"{BASE}/v1/jobs/{job}", headers=ALICE, timeout=60)
        assert status.status_code == 200, status.text
        if status.json()["status"] in ("succeeded", "failed"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert status.json()["status"] == "succeeded", status.text
    (other,) = [replica for replica in replica_ids(root) if replica != uploader]
    deadline = time.monotonic() + 10  # the documented bound: well under this
    while on_replica(other, "GET", "/v1/corpora/notes")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    code, _, text = on_replica(
        other,
        "POST",
        "/v1/query",
        {"query": "Who wrote it?", "corpus": "notes", "k": 2, "max_tokens": 2},
    )
    assert code == 200, text
    assert len(json.loads(text)["sources"]) == 2
    # a delete through the other replica is seen by both
    doc_id = json.loads(on_replica(other, "GET", "/v1/corpora/notes")[2])
    documents = httpx.get(f"{BASE}/v1/corpora/notes", headers=ALICE, timeout=60).json()
    assert documents["num_documents"] == 3 == doc_id["num_documents"]
    code, _, text = on_replica(other, "DELETE", "/v1/corpora/notes")
    assert code == 200, text
    deadline = time.monotonic() + 10
    while on_replica(uploader, "GET", "/v1/corpora/notes")[0] != 404:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def bounded_load(handle: object, count: int) -> list[object]:
    texts = passages(8)
    return [
        handle.answer.remote([texts[i % 8], texts[(i + 3) % 8]], f"Question {i}?", max_tokens=2)  # type: ignore[attr-defined]
        for i in range(count)
    ]


def test_redis_killed_and_restarted_under_load_fails_no_request(cluster: tuple) -> None:
    handle, redis_server, _ = cluster
    responses = bounded_load(handle, 6)
    redis_server.kill()
    responses += bounded_load(handle, 6)
    time.sleep(1.0)
    redis_server.start()  # empty: no persistence, so every entry is recomputed or local
    responses += bounded_load(handle, 6)
    results = [response.result(timeout_s=300) for response in responses]  # type: ignore[attr-defined]
    assert all(result["completion_tokens"] == 2 for result in results)
    stats = handle.cache_stats.remote().result()
    assert stats["tiers"]["remote"]["outages"] >= 1


def test_a_replica_killed_with_sigkill_fails_no_request(cluster: tuple) -> None:
    handle, _, _ = cluster
    victim = answer(handle, passages(1))["pid"]
    responses = bounded_load(handle, 10)
    os.kill(victim, signal.SIGKILL)
    responses += bounded_load(handle, 10)
    results = [response.result(timeout_s=600) for response in responses]  # type: ignore[attr-defined]
    assert all(result["completion_tokens"] == 2 for result in results)
    assert any(result["pid"] != victim for result in results)
