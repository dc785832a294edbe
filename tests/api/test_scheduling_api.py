"""Over real HTTP: a server that overlaps chunk KV reads with encoding and orders its
work cache-aware answers exactly as one that does neither."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server
from tests.service.test_chunk_gather import QUESTION, half_cached  # noqa: F401  (fixture)
from tests.service_helpers import minilm, tiny_config, tiny_loaded


def answers_over_http(data_dir: Path, overlap: bool, policy: str) -> list[dict[str, Any]]:
    config = tiny_config(data_dir)
    config.service.kv_precompute = "lazy"
    config.service.overlap_kv = overlap
    config.engine.scheduling_policy = policy
    results = []
    with RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag:
        with (
            running_server(create_app(rag)) as url,
            httpx.Client(base_url=url, timeout=120) as http,
        ):
            for question, k in ((QUESTION, 5), (QUESTION, 5)):
                body = {"query": question, "corpus": "docs", "k": k, "max_tokens": 6}
                response = http.post("/v1/query", json=body)
                assert response.status_code == 200, response.text
                results.append(response.json())
        manager = rag.engine.block_manager
        assert manager.num_free_blocks == manager.num_blocks
    return results


def test_overlapped_cache_aware_server_answers_like_the_plain_one(
    half_cached: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    plain = answers_over_http(shutil.copytree(half_cached, tmp_path / "plain"), False, "fcfs")
    tuned = answers_over_http(shutil.copytree(half_cached, tmp_path / "tuned"), True, "cache_aware")
    assert [r["answer"] for r in tuned] == [r["answer"] for r in plain]
    assert [r["cache"] for r in tuned] == [r["cache"] for r in plain]
    first, again = tuned
    assert first["cache"]["tokens_by_tier"].get("disk", 0) > 0
    assert first["cache"]["computed_tokens"] > 0
    assert again["cache"]["computed_tokens"] == 0
    assert {"cache_fetch", "kv_compute", "ttft"} <= set(first["timings"])
