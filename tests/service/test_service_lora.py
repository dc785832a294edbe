"""LoRA adapters in the RAG service: chunk caches keyed per adapter, answers equal to a
service on the merged model, and adapters loaded and unloaded while it runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragcache.chunkstore.keys import KeyContext, chunk_key
from ragcache.engine.loader import LoadedModel
from ragcache.errors import ConflictError, InvalidInputError, NotFoundError
from ragcache.service import RagCache
from tests.lora_helpers import PeftAdapter, fresh_tiny_model, make_peft_adapter
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded

QUESTION = "What did Lincoln say at Gettysburg about the nation?"
GETTYSBURG = SAMPLES / "gettysburg_address.md"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeftAdapter]:
    root = tmp_path_factory.mktemp("service-adapters")
    shape = {"vocab_size": len(tiny_loaded().tokenizer)}
    return {
        "a": make_peft_adapter(root / "a", seed=11, model=shape),
        "b": make_peft_adapter(root / "b", seed=12, model=shape, targets=["k_proj", "v_proj"]),
    }


def open_service(data_dir: Path, loaded: LoadedModel, adapters: list[str]) -> RagCache:
    config = tiny_config(data_dir)
    config.lora.adapters = adapters
    return RagCache(config=config, loaded=loaded, embedder=minilm())


@pytest.fixture(scope="module")
def rag(
    tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, PeftAdapter]
) -> Iterator[RagCache]:
    specs = [f"{name}={adapter.path}" for name, adapter in adapters.items()]
    data = tmp_path_factory.mktemp("lora-service") / "data"
    with open_service(data, fresh_tiny_model(), specs) as service:
        service.ingest([GETTYSBURG], "speech", create=True)
        yield service


def test_one_chunk_under_two_adapters_is_two_entries_never_reused_across(rag: RagCache) -> None:
    top = rag.retrieve(QUESTION, "speech", k=1)[0]
    record = rag.corpora.chunks("speech", [top.chunk_id])[0]
    assert record is not None
    chunk = record.token_ids + rag.prompts.separator_ids
    base, under_a, under_b = (rag.for_adapter(n).chunk_cache for n in (None, "a", "b"))
    keys = {cache.key(chunk) for cache in (base, under_a, under_b)}
    assert len(keys) == 3
    context = KeyContext(rag.loaded.fingerprint, str(rag.loaded.dtype), "raw")
    root = chunk_key(context, [], rag.prompts.root_ids)
    assert base.key(chunk) == chunk_key(context, [root], chunk), "base keys must not change"
    assert base.contains(chunk) and not under_a.contains(chunk) and not under_b.contains(chunk)

    first = rag.for_adapter("a").query(QUESTION, "speech", k=2)
    assert first.cache.tokens_by_tier == {} and first.cache.computed_tokens > 0
    assert under_a.contains(chunk) and not under_b.contains(chunk)
    again = rag.for_adapter("a").query(QUESTION, "speech", k=2)
    assert again.cache.computed_tokens == 0 and again.cache.tokens_by_tier
    assert again.answer == first.answer
    other = rag.for_adapter("b").query(QUESTION, "speech", k=2)
    assert other.cache.tokens_by_tier == {} and under_b.contains(chunk)
    tenant_view = rag.for_tenant("t1").for_adapter("a").chunk_cache.tree.context
    assert tenant_view.tenant == "t1" and tenant_view.adapter_id.startswith("a@")


@pytest.mark.parametrize("method", ["cacheblend", "full_reuse"])
def test_answers_under_an_adapter_equal_a_service_on_the_merged_model(
    rag: RagCache, adapters: dict[str, PeftAdapter], tmp_path: Path, method: str
) -> None:
    loaded = dataclasses.replace(adapters["a"].merged, tokenizer=tiny_loaded().tokenizer)
    with open_service(tmp_path / "merged", loaded, []) as reference:
        reference.ingest([GETTYSBURG], "speech", create=True)
        expected = reference.query(QUESTION, "speech", k=3, method=method)
    answer = rag.for_adapter("a").query(QUESTION, "speech", k=3, method=method)
    assert answer.answer == expected.answer and answer.completion_tokens >= 1
    base = rag.query(QUESTION, "speech", k=3, method=method)
    assert base.answer != answer.answer


def test_adapters_load_and_unload_while_serving(
    rag: RagCache, adapters: dict[str, PeftAdapter], tmp_path: Path
) -> None:
    info = rag.load_adapter("c", str(adapters["b"].path))
    assert info.fingerprint == rag.adapter_info("b").fingerprint
    assert [a.name for a in rag.list_adapters()] == ["a", "b", "c"]
    assert rag.for_adapter("c").query(QUESTION, "speech", k=1).completion_tokens >= 1
    with pytest.raises(ConflictError, match="already served"):
        rag.load_adapter("c", str(adapters["b"].path))
    with pytest.raises(ConflictError, match="already served"):
        rag.load_adapter(rag.loaded.name, str(adapters["b"].path))
    with pytest.raises(InvalidInputError, match="has no adapter_config"):
        rag.load_adapter("d", str(tmp_path))
    assert rag.unload_adapter("c").name == "c"
    with pytest.raises(NotFoundError, match=r"adapter 'c' is not loaded \(adapters: a, b\)"):
        rag.for_adapter("c")
    with pytest.raises(NotFoundError, match="'c' is not loaded"):
        rag.unload_adapter("c")
