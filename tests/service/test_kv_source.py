"""The query path's chunk KV: hits streamed from the disk tier into fusion on the engine
thread, and a chunk the tier loses between lookup and read computed there instead
(real LMDB, tiny model, the service's own engine thread)."""

from __future__ import annotations

from pathlib import Path

import torch

from ragcache.blending.registry import make_method
from ragcache.service import RagCache
from ragcache.service.model_calls import QueryCost
from tests.service.test_chunk_gather import QUESTION, retrieved_chunks
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded


def disk_only_service(data_dir: Path) -> RagCache:
    config = tiny_config(data_dir)
    config.service.kv_precompute = "eager"
    config.chunkstore.host_bytes = 0  # every hit is read from LMDB
    return RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())


def test_a_chunk_lost_mid_read_is_computed_on_the_engine_thread(tmp_path: Path) -> None:
    with disk_only_service(tmp_path / "data") as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES], "docs")
        chunks = retrieved_chunks(rag, k=3)
        layout = rag.prompts.layout(chunks, QUESTION)
        method = make_method("cacheblend", ratio=0.3)
        cost = QueryCost(0, 1)

        def streamed_hits() -> list:
            hits = [rag.kv.fetch_one(ids) for ids in chunks]
            assert all(hit is not None and hit[1] == "disk" for hit in hits)
            return [hit[0] for hit in hits if hit is not None]

        reference = rag.kv.fuse(layout, streamed_hits(), method, {}, cost)
        parts = streamed_hits()
        lost = chunks[1]
        assert rag.chunk_cache.store.delete(rag.chunk_cache.key(lost))
        fused = rag.kv.fuse(layout, parts, method, {}, cost)
        assert fused.report.lost_chunks == 1
        assert reference.report.lost_chunks == 0
        assert fused.report.load_wait_s <= fused.report.prepare_s
        assert fused.placed is not None and reference.placed is not None
        assert fused.placed.recompute == reference.placed.recompute
        for got, want in zip(fused.placed.v, reference.placed.v, strict=True):
            torch.testing.assert_close(got, want)
