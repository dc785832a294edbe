"""Reading cached chunk KV while missing chunks are encoded changes no answer, no KV and
no cache state; it only changes the waiting (real faiss index, real LMDB, tiny model)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.layer_pipeline import StreamedChunk
from ragcache.engine.sampling_params import SamplingParams
from ragcache.service import RagCache
from ragcache.service.chunk_gather import gather_overlapped, gather_sequential
from ragcache.service.model_calls import QueryCost
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded

QUESTION = "What did Lincoln say at Gettysburg about the nation?"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def open_service(data_dir: Path, overlap: bool) -> RagCache:
    config = tiny_config(data_dir)
    config.service.kv_precompute = "lazy"
    config.service.overlap_kv = overlap
    return RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())


@pytest.fixture(scope="module")
def half_cached(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose LMDB tier holds the KV of the top 2 chunks of QUESTION,
    and nothing of the others: a k=5 query then reads some chunks and encodes others."""
    data_dir = tmp_path_factory.mktemp("half") / "data"
    with open_service(data_dir, overlap=False) as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES], "docs")
        rag.query(QUESTION, "docs", k=2, sampling=GREEDY)
    return data_dir


def copy_of(data_dir: Path, target: Path) -> Path:
    shutil.copytree(data_dir, target)
    return target


def retrieved_chunks(rag: RagCache, k: int) -> list[list[int]]:
    """The chunk token ids a corpus query over ``k`` chunks puts in its prompt."""
    _, records = rag.tenant_corpora.retrieve(QUESTION, "docs", k)
    return [record.token_ids + rag.prompts.separator_ids for record in records]


def encode_now(rag: RagCache):
    return lambda missing: rag.kv.encode(missing, QueryCost(0, 1))


def tensors(kv: ChunkKV | StreamedChunk) -> list[torch.Tensor]:
    """K then V of every layer; a streamed hit's layers are read from its tier now."""
    if isinstance(kv, ChunkKV):
        return [*kv.k, *kv.v]
    layers = [pair for _, pair in kv.layers]
    return [k for k, _ in layers] + [v for _, v in layers]


def test_overlapped_query_answers_exactly_as_the_sequential_one(
    half_cached: Path, tmp_path: Path
) -> None:
    results, stats = {}, {}
    for overlap in (False, True):
        data_dir = copy_of(half_cached, tmp_path / f"overlap-{overlap}")
        with open_service(data_dir, overlap) as rag:
            results[overlap] = rag.query(QUESTION, "docs", k=5, sampling=GREEDY)
            manager = rag.engine.block_manager
            assert manager.num_free_blocks == manager.num_blocks
            assert all(block.ref_count == 0 for block in manager.blocks)
            stats[overlap] = rag.chunk_cache.stats()
    sequential, overlapped = results[False], results[True]
    assert overlapped.answer == sequential.answer
    assert overlapped.cache == sequential.cache
    assert [s.cache_tier for s in overlapped.sources] == [s.cache_tier for s in sequential.sources]
    # The mix this test is about: some chunks read from LMDB, some encoded for the query.
    assert overlapped.cache.tokens_by_tier.get("disk", 0) > 0
    assert overlapped.cache.computed_tokens > 0
    assert stats[True]["tree_nodes"] == stats[False]["tree_nodes"]
    assert stats[True]["tiers"] == stats[False]["tiers"]


def test_a_chunk_evicted_between_lookup_and_read_is_encoded_after(
    half_cached: Path, tmp_path: Path
) -> None:
    data_dir = copy_of(half_cached, tmp_path / "evicted")
    with open_service(data_dir, overlap=True) as rag:
        chunks = retrieved_chunks(rag, k=4)
        cached = [rag.chunk_cache.contains(ids) for ids in chunks]
        assert cached.count(True) == 2

        evicted = chunks[cached.index(True)]

        def read_after_eviction(ids: list[int]):  # the entry goes between lookup and read
            if ids == evicted:
                rag.chunk_cache.store.delete(rag.chunk_cache.key(ids))
            return rag.kv.fetch_one(ids)

        gathered = gather_overlapped(
            chunks, rag.chunk_cache.contains, read_after_eviction, encode_now(rag), rag.kv_pool
        )
        reference = gather_sequential(chunks, rag.kv.fetch_one, encode_now(rag))
        assert [hit is None for hit in gathered.hits].count(True) == 3
        assert [kv.token_ids for kv in gathered.kvs] == chunks
        assert [kv.token_ids for kv in gathered.computed] == [
            ids for ids, hit in zip(chunks, gathered.hits, strict=True) if hit is None
        ]
        assert [kv.token_ids for kv in reference.kvs] == chunks
        for mine, theirs, hit in zip(gathered.kvs, reference.kvs, gathered.hits, strict=True):
            for p, q in zip(tensors(mine), tensors(theirs), strict=True):
                if hit is not None:  # both read from the same record
                    assert torch.equal(p, q)
                else:
                    torch.testing.assert_close(p, q)


def test_a_failed_read_waits_for_the_encoding_and_raises(half_cached: Path, tmp_path: Path) -> None:
    data_dir = copy_of(half_cached, tmp_path / "failing")
    with open_service(data_dir, overlap=True) as rag:
        chunks = retrieved_chunks(rag, k=4)
        encoded: list[int] = []

        def encode(missing: list[list[int]]):
            out = encode_now(rag)(missing)
            encoded.append(len(out))
            return out

        def broken_read(ids: list[int]):
            raise OSError("disk went away")

        with pytest.raises(OSError, match="disk went away"):
            gather_overlapped(chunks, rag.chunk_cache.contains, broken_read, encode, rag.kv_pool)
        assert encoded == [2]
        manager = rag.engine.block_manager
        assert manager.num_free_blocks == manager.num_blocks
