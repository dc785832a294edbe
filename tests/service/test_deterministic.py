"""Deterministic requests: with the real model, a request served from warm caches (tree
paths stored, engine prefix blocks, Cache-Craft variants and history) returns the greedy
tokens of the same request served cold, bit for bit."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from ragcache.config import Config
from ragcache.engine.config import ModelConfig
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.sampling_params import SamplingParams
from ragcache.errors import InvalidParameterError
from ragcache.service import RagCache
from tests.service_helpers import SAMPLES, minilm

pytestmark = pytest.mark.slow

QUESTION = "What did the speaker say about the nation and its fathers?"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@functools.cache
def smollm2() -> LoadedModel:
    return load_model(ModelConfig(dtype="float32"))


def documents() -> list[str]:
    texts = []
    for name in ("gettysburg_address.md", "declaration_of_independence.txt"):
        paragraphs = (SAMPLES / name).read_text(encoding="utf-8").split("\n\n")
        texts += [p.strip()[:400] for p in paragraphs if len(p.strip()) > 150][:2]
    return texts


def open_service(data_dir: Path, deterministic: bool = False) -> RagCache:
    config = Config()
    config.data_dir = str(data_dir)
    config.service.kv_precompute = "lazy"
    config.service.deterministic = deterministic
    config.chunkstore.cost_model = "default"
    config.engine.kv_cache_bytes = 256 * 1024 * 1024
    return RagCache(config=config, loaded=smollm2(), embedder=minilm())


def answer(rag: RagCache, docs: list[str], method: str, **params: float | bool) -> list[int]:
    prepared = rag.prepare_documents(docs, QUESTION, method, dict(params), GREEDY)

    async def run() -> list[int]:
        last = None
        async for out in rag.generate(prepared):
            last = out
        assert last is not None
        return last.token_ids

    return asyncio.run(run())


def test_warm_caches_give_the_cold_answer_bit_for_bit(tmp_path: Path) -> None:
    docs = documents()
    reordered = [docs[2], docs[0], docs[1], docs[3]]
    with open_service(tmp_path / "cold") as rag:
        cold_blend = answer(rag, docs, "cacheblend", deterministic=True)
    with open_service(tmp_path / "cold_craft") as rag:
        cold_craft = answer(rag, docs, "cachecraft", deterministic=True)
    with open_service(tmp_path / "warm") as rag:
        answer(rag, docs, "full_prefill")  # stores the exact path of these chunks
        answer(rag, reordered, "cachecraft")  # teaches Cache-Craft the chunks' deviations
        answer(rag, docs, "cachecraft")  # stores this order's repaired variants
        default = rag.prepare_documents(docs, QUESTION, "cacheblend", {}, GREEDY)
        assert default.usage.exact_tokens > 0, "by default a warm request takes its path"
        warm_blend = answer(rag, docs, "cacheblend", deterministic=True)
        again_blend = answer(rag, docs, "cacheblend", deterministic=True)
        warm_craft = answer(rag, docs, "cachecraft", deterministic=True)
        pinned = rag.prepare_documents(docs, QUESTION, "cacheblend", {"deterministic": True})
        assert pinned.usage.exact_tokens == 0 and not pinned.fused.use_prefix_cache
        assert pinned.usage.computed_tokens == 0, "lossless chunk KV is still read"
    assert warm_blend == cold_blend and again_blend == cold_blend
    assert warm_craft == cold_craft


def test_the_config_makes_every_request_deterministic_and_a_request_may_opt_out(
    tmp_path: Path,
) -> None:
    docs = documents()[:2]
    with open_service(tmp_path / "data", deterministic=True) as rag:
        answer(rag, docs, "full_prefill")
        pinned = rag.prepare_documents(docs, QUESTION, "cacheblend", {}, GREEDY)
        opted = rag.prepare_documents(docs, QUESTION, "cacheblend", {"deterministic": False})
        with pytest.raises(InvalidParameterError, match="deterministic"):
            rag.prepare_documents(docs, QUESTION, "cacheblend", {"deterministic": 1.0})
    assert pinned.usage.exact_tokens == 0 and not pinned.fused.use_prefix_cache
    assert opted.usage.exact_tokens > 0


def test_a_lossy_codec_is_never_read_by_a_deterministic_request(tmp_path: Path) -> None:
    config = Config()
    config.data_dir = str(tmp_path / "data")
    config.service.kv_precompute = "lazy"
    config.chunkstore.disk_codec = "int8"
    config.chunkstore.host_bytes = 0
    config.chunkstore.cost_model = "default"
    config.engine.kv_cache_bytes = 256 * 1024 * 1024
    docs = documents()[:2]
    with RagCache(config=config, loaded=smollm2(), embedder=minilm()) as rag:
        cold = answer(rag, docs, "cacheblend", deterministic=True)
        lossy = rag.prepare_documents(docs, QUESTION, "cacheblend", {}, GREEDY)
        assert lossy.usage.tokens_by_tier.get("disk", 0) > 0
        pinned = rag.prepare_documents(docs, QUESTION, "cacheblend", {"deterministic": True})
        assert pinned.usage.tokens_by_tier == {} and pinned.usage.computed_tokens > 0
        warm = answer(rag, docs, "cacheblend", deterministic=True)
    assert warm == cold
