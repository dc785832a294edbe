"""Exact knowledge-tree paths: stored by full prefills (or every query in 'always' mode),
reused with no repair by later queries whose chunks start with the same ordered path."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragcache.engine.sampling_params import SamplingParams
from ragcache.service import RagCache
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded

QUESTION = "What did Lincoln say at Gettysburg about the nation?"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def open_service(data_dir: Path, tree_paths: str) -> RagCache:
    config = tiny_config(data_dir)
    config.service.tree_paths = tree_paths
    rag = RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())
    rag.create_corpus("docs")
    rag.ingest(
        [SAMPLES / "gettysburg_address.md", SAMPLES / "tale_of_two_cities_opening.txt"], "docs"
    )
    return rag


def test_a_full_prefill_stores_its_path_and_a_repeat_reuses_it_exactly(tmp_path: Path) -> None:
    with open_service(tmp_path / "data", "reuse") as rag:
        blended = rag.query(QUESTION, "docs", k=3, method="cacheblend", sampling=GREEDY)
        full = rag.query(QUESTION, "docs", k=3, method="full_prefill", sampling=GREEDY)
        repeat = rag.query(QUESTION, "docs", k=3, method="cacheblend", sampling=GREEDY)
        nodes = rag.chunk_cache.stats()["tree_nodes"]
    context = blended.cache.reused_tokens + blended.cache.recomputed_tokens
    assert blended.cache.exact_tokens == 0 and blended.cache.recomputed_tokens > 0
    assert full.cache.reused_tokens == 0 and full.cache.exact_tokens == context
    assert repeat.cache.exact_tokens == context and repeat.cache.recomputed_tokens == 0
    assert repeat.cache.computed_tokens == 0
    assert repeat.answer == full.answer, "an exact path reproduces the full prefill"
    assert nodes >= 3


def test_another_order_reuses_only_the_shared_head_of_the_path(tmp_path: Path) -> None:
    texts = [
        "Four score and seven years ago our fathers brought forth a new nation.",
        "It was the best of times, it was the worst of times.",
        "We hold these truths to be self-evident, that all men are created equal.",
        "Call me Ishmael. Some years ago, never mind how long precisely.",
    ]
    a, b, c, d = texts
    with open_service(tmp_path / "data", "reuse") as rag:
        rag.prepare_documents([a, b, c], QUESTION, "full_prefill", sampling=GREEDY)
        same = rag.prepare_documents([a, b, c], QUESTION, "cacheblend", sampling=GREEDY)
        head = rag.prepare_documents([a, b, d], QUESTION, "cacheblend", sampling=GREEDY)
        swapped = rag.prepare_documents([b, a, c], QUESTION, "cacheblend", sampling=GREEDY)
        lengths = [len(rag.prompts.chunk_ids(text)) for text in texts]
    assert same.usage.exact_tokens == sum(lengths[:3]) and same.usage.recomputed_tokens == 0
    assert head.usage.exact_tokens == lengths[0] + lengths[1]
    assert head.usage.recomputed_tokens > 0, "the chunk off the path is repaired"
    assert swapped.usage.exact_tokens == 0, "no path starts with b then a"


@pytest.mark.parametrize("method", ["cacheblend", "legolink", "full_reuse"])
def test_always_mode_computes_the_path_once_and_then_reuses_it(tmp_path: Path, method: str) -> None:
    with open_service(tmp_path / method, "always") as rag:
        first = rag.query(QUESTION, "docs", k=3, method=method, sampling=GREEDY)
        second = rag.query(QUESTION, "docs", k=3, method=method, sampling=GREEDY)
    context = first.cache.reused_tokens + first.cache.recomputed_tokens
    # The first chunk is on the path from ingestion (computed right after the root).
    assert first.cache.computed_tokens > 0 and first.cache.exact_tokens == context
    assert second.cache.recomputed_tokens == 0 and second.cache.exact_tokens == context
    assert second.answer == first.answer


def test_a_path_under_a_lossy_codec_is_never_reused_as_exact(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data")
    config.chunkstore.disk_codec = "int8"
    config.chunkstore.host_bytes = 0
    with RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag:
        rag.create_corpus("docs")
        rag.ingest([SAMPLES / "gettysburg_address.md"], "docs")
        rag.query(QUESTION, "docs", k=2, method="full_prefill", sampling=GREEDY)
        repeat = rag.query(QUESTION, "docs", k=2, method="cacheblend", sampling=GREEDY)
    assert repeat.cache.exact_tokens == 0
