"""Two generator replicas on Ray Serve (loopback) sharing a real redis-server: a chunk one
replica encodes is served to the other from Redis, and the router follows the chunks."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

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


def passages(count: int) -> list[str]:
    texts = [path.read_text(encoding="utf-8") for path in sorted(SAMPLES.iterdir())]
    pieces = [text[start : start + 300] for text in texts for start in (0, 400, 800)]
    return [piece for piece in pieces if piece.strip()][:count]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, LocalRedis]]:
    root = tmp_path_factory.mktemp("cluster")
    with RagCache(config=tiny_config(root / "corpus")) as ingest:
        ingest.create_corpus("samples")
        ingest.ingest([str(SAMPLES)], "samples")
    redis_server = LocalRedis().start()
    config = tiny_config(root / "unused")
    config.chunkstore.remote_url = redis_server.url
    config.chunkstore.remote_namespace = f"cluster-{uuid.uuid4().hex[:8]}"
    config.chunkstore.cost_model = "default"  # no prefill timing in every new replica
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    spec = deployments.ClusterSpec(
        config,
        str(root / "replicas"),
        corpus_dir=str(root / "corpus"),
        generators=2,
        stats_period_s=STATS_PERIOD_S,
        generator_cpus=1.0,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        handle = serve.run(deployments.build_app(spec), name="ragcache", route_prefix="/")
        yield handle, redis_server
    finally:
        serve.shutdown()
        ray.shutdown()
        redis_server.close()


def answer(handle: object, documents: list[str]) -> dict:
    result = handle.answer.remote(documents, "What is this about?", max_tokens=2).result()  # type: ignore[attr-defined]
    time.sleep(8 * STATS_PERIOD_S)  # the router sees the replicas' new memory
    return result


def test_a_chunk_encoded_by_one_replica_is_read_by_the_other_from_redis(cluster: tuple) -> None:
    handle, _ = cluster
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
    handle, _ = cluster
    result = handle.query.remote(
        "four score and seven years", "samples", k=2, max_tokens=2
    ).result()
    assert len(result["sources"]) == 2
    assert len(result["chunk_tiers"]) == 2
    assert result["completion_tokens"] == 2


def test_the_frontend_answers_json_over_http(cluster: tuple) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{HTTP_PORT}/",
        json={"question": "Who wrote it?", "corpus": "samples", "k": 1, "max_tokens": 2},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["completion_tokens"] == 2 and len(body["sources"]) == 1


def bounded_load(handle: object, count: int) -> list[object]:
    texts = passages(8)
    return [
        handle.answer.remote([texts[i % 8], texts[(i + 3) % 8]], f"Question {i}?", max_tokens=2)  # type: ignore[attr-defined]
        for i in range(count)
    ]


def test_redis_killed_and_restarted_under_load_fails_no_request(cluster: tuple) -> None:
    handle, redis_server = cluster
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
    handle, _ = cluster
    victim = answer(handle, passages(1))["pid"]
    responses = bounded_load(handle, 10)
    os.kill(victim, signal.SIGKILL)
    responses += bounded_load(handle, 10)
    results = [response.result(timeout_s=600) for response in responses]  # type: ignore[attr-defined]
    assert all(result["completion_tokens"] == 2 for result in results)
    assert any(result["pid"] != victim for result in results)
