"""A chunk's cached KV is served only under the system prompt it was computed after."""

from __future__ import annotations

from pathlib import Path

from ragcache.service import RagCache
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded

QUESTION = "What did Lincoln say at Gettysburg about the nation?"


def open_service(data_dir: Path, system_prompt: str | None = None) -> RagCache:
    config = tiny_config(data_dir)
    if system_prompt is not None:
        config.service.system_prompt = system_prompt
    return RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())


def test_a_restart_with_another_system_prompt_recomputes_every_chunk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with open_service(data) as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES / "gettysburg_address.md"], "docs")
        warm = rag.query(QUESTION, "docs", k=2)
    assert warm.cache.computed_tokens == 0 and warm.cache.cached_tokens > 0
    with open_service(data, system_prompt="Answer in one word.") as rag:
        other = rag.query(QUESTION, "docs", k=2)
        again = rag.query(QUESTION, "docs", k=2)
    assert other.cache.tokens_by_tier == {} and other.cache.computed_tokens > 0
    assert again.cache.computed_tokens == 0, "chunks computed under the new prompt are kept"
    with open_service(data) as rag:
        back = rag.query(QUESTION, "docs", k=2)
    assert back.cache.computed_tokens == 0 and back.cache.tokens_by_tier.get("disk", 0) > 0
    assert back.answer == warm.answer


def test_kv_read_through_a_lossy_codec_never_enters_the_exact_prefix(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data")
    config.chunkstore.disk_codec = "int8"
    config.chunkstore.host_bytes = 0  # every read comes from the disk tier, decoded
    with RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES / "gettysburg_address.md"], "docs")
        lossy = rag.prepare_corpus(QUESTION, "docs", 2, "prefix_only", {}, None)
    assert lossy.usage.tokens_by_tier.get("disk", 0) > 0
    assert lossy.fused.placed is not None
    assert lossy.fused.placed.exact_prefix == len(rag.prompts.root_ids)
    with open_service(tmp_path / "raw") as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES / "gettysburg_address.md"], "docs")
        exact = rag.prepare_corpus(QUESTION, "docs", 2, "prefix_only", {}, None)
    assert exact.fused.placed is not None
    assert exact.fused.placed.exact_prefix > len(rag.prompts.root_ids)


def test_a_lossy_remote_codec_makes_cached_kv_inexact(tmp_path: Path) -> None:
    from ragcache.chunkstore.config import ChunkStoreConfig
    from ragcache.chunkstore.store import ChunkStore
    from ragcache.service.chunk_cache import store_is_lossless

    lossy = ChunkStoreConfig(remote_url="redis://127.0.0.1:9/0", remote_codec="int8")
    plain = ChunkStoreConfig()
    for config, expected in ((lossy, False), (plain, True)):
        store = ChunkStore(config, tmp_path / str(expected))
        try:
            assert store_is_lossless(store) is expected
        finally:
            store.close()
