"""Cache-Craft through the service: repaired variants stored under their context and
reused when the same chunks come again in the same order, budgets only where needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ragcache.blending.cachecraft import CacheCraft, ChunkHint
from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.blending.fuser import fuse
from ragcache.blending.methods import FusionContext, FusionPlan
from ragcache.blending.prompt import PromptBuilder
from ragcache.blending.selection_pass import run_fresh_pass
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.sampling_params import SamplingParams
from ragcache.service import RagCache
from tests.service_helpers import minilm, tiny_config, tiny_loaded

QUESTION = "What did Lincoln say at Gettysburg about the nation?"
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
TEXTS = [
    "Four score and seven years ago our fathers brought forth a new nation.",
    "It was the best of times, it was the worst of times, the age of wisdom.",
    "We hold these truths to be self-evident, that all men are created equal.",
]


def open_service(data_dir: Path) -> RagCache:
    config = tiny_config(data_dir)
    config.service.kv_precompute = "lazy"
    return RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())


def test_a_repeat_in_the_same_order_reuses_the_repaired_variants(tmp_path: Path) -> None:
    params = {"recompute_ratio": 0.3}
    with open_service(tmp_path / "data") as rag:
        first = rag.prepare_documents(TEXTS, QUESTION, "cachecraft", params, GREEDY)
        repeat = rag.prepare_documents(TEXTS, QUESTION, "cachecraft", params, GREEDY)
        swapped = rag.prepare_documents(
            [TEXTS[1], TEXTS[0], TEXTS[2]], QUESTION, "cachecraft", params, GREEDY
        )
        lengths = [len(rag.prompts.chunk_ids(text)) for text in TEXTS]
        book = rag.chunk_cache.variants
        keys = [rag.chunk_cache.key(rag.prompts.chunk_ids(text)) for text in TEXTS]
        record = book.deviation(keys[1])
        assert book.contains(keys[:1], rag.prompts.chunk_ids(TEXTS[1]))
        assert not book.contains(keys[1:2], rag.prompts.chunk_ids(TEXTS[2]))
    # Only the chunks after the first are repaired; the first is exact where it stands.
    assert first.usage.recomputed_tokens == round(0.3 * (lengths[1] + lengths[2]))
    assert repeat.usage.recomputed_tokens == 0, "every later chunk found its variant"
    assert repeat.usage.exact_tokens == 0, "a variant is repaired KV, never exact"
    assert swapped.usage.recomputed_tokens > 0, "another order is another context"
    assert record is not None and record.contexts == 1 and record.variant_hits == 1


@dataclass(slots=True)
class FixedSelection:
    """CacheBlend's fresh first layers with a given token set left to the engine."""

    tokens: list[int]
    check_layer: int = 1
    name: str = "fixed"

    def plan(self, ctx: FusionContext) -> FusionPlan:
        layers = self.check_layer + 1
        fresh = run_fresh_pass(ctx.model, ctx.layout, layers)
        return FusionPlan(recompute=list(self.tokens), fresh_layers=layers, fresh=fresh)


def test_the_repair_pass_matches_the_engine_recomputing_the_same_tokens() -> None:
    loaded = tiny_loaded()
    prompts = PromptBuilder(loaded.tokenizer, "Answer from the passages.")
    chunks = [prompts.chunk_ids(text) for text in TEXTS]
    layout = prompts.layout(chunks, QUESTION)
    encoder = ChunkEncoder(loaded.model, prompts.root_ids)
    kvs = encoder.encode(chunks)
    craft = CacheCraft(ratio=0.3)
    crafted = fuse(loaded.model, layout, encoder.root, kvs, craft)
    assert crafted.placed is not None and crafted.placed.recompute == []
    chosen = craft.repaired
    assert crafted.report.recomputed_tokens == len(chosen) > 0
    assert crafted.report.reused_tokens + crafted.report.recomputed_tokens == (
        crafted.report.context_tokens
    )
    by_engine = fuse(loaded.model, layout, encoder.root, kvs, FixedSelection(chosen))
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=1 << 24, enable_prefix_caching=False))
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=True)
    logprobs = []
    for fused in (crafted, by_engine):
        seq = engine.add_request(fused.prompt_ids, scoring, placed=fused.placed)
        while engine.has_unfinished():
            engine.step()
        start = layout.context_end + 1
        logprobs.append(torch.tensor([seq.prompt_logprobs[i] for i in range(start, len(layout))]))
    torch.testing.assert_close(logprobs[0], logprobs[1], atol=1e-4, rtol=1e-4)
    assert craft.variants and all(not v.kv.exact for v in craft.variants.values())


def test_known_insensitive_and_variant_chunks_get_no_budget() -> None:
    craft = CacheCraft(insensitive=0.05, min_contexts=2)
    craft.hints = [
        ChunkHint(),
        ChunkHint(variant=True),
        ChunkHint(contexts=3, mean_deviation=0.01),
        ChunkHint(contexts=1, mean_deviation=0.01),
        ChunkHint(contexts=3, mean_deviation=0.2),
    ]
    assert [craft.needs_repair(i) for i in range(5)] == [False, False, False, True, True]
