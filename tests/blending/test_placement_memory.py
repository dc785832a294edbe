"""A fused query allocates no buffer of the context's KV over every layer: placed chunk
KV is built one layer at a time while the engine writes it into its paged blocks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ragcache.bench.fusion_memory import first_token, peak_and_largest
from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.blending.fuser import fuse
from ragcache.blending.registry import make_method
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from tests.blending.test_fusion import random_layout
from tests.conftest import loaded_from_hf, random_hf_model


@pytest.fixture(scope="module")
def deep_model() -> LoadedModel:
    """Many layers, small everything else: the placed KV over every layer dwarfs the
    prefill's own working tensors, as it does in a real model over a long context."""
    return loaded_from_hf(random_hf_model("llama", num_hidden_layers=24))


def allocations(run: Callable[[], None]) -> tuple[int, int]:
    """Peak bytes live at once and the largest allocation while ``run`` runs."""
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        run()
    return peak_and_largest(prof.profiler.kineto_results.events())


@pytest.mark.parametrize("method", ["full_reuse", "legolink", "cacheblend", "queryblend"])
def test_fused_query_holds_no_copy_of_the_context_kv_over_every_layer(
    deep_model: LoadedModel, method: str
) -> None:
    layout = random_layout(10, seed=21)
    spec = deep_model.spec
    encoder = ChunkEncoder(deep_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    engine = Engine(deep_model, EngineConfig(kv_cache_bytes=32 << 20, block_size=16))
    placed_tokens: list[int] = []

    def fused_query() -> None:
        fused = fuse(deep_model.model, layout, encoder.root, chunks, make_method(method))
        assert fused.placed is not None
        placed_tokens.append(fused.placed.num_tokens)
        first_token(engine, fused.prompt_ids, fused.placed)

    prefill_peak, prefill_largest = allocations(
        lambda: first_token(engine, layout.prompt_ids, None)
    )
    peak, largest = allocations(fused_query)
    assert placed_tokens == [layout.context_end]
    one_layer_kv = 2 * len(layout) * spec.num_kv_heads * spec.head_dim * 4
    # A buffer of the context's K or V over every layer would be 12 layers' worth here.
    assert largest <= max(prefill_largest, 6 * one_layer_kv), (largest, one_layer_kv)
    # Beyond a full prefill's working memory, the selection passes keep a few layers
    # (CacheBlend's check layers, gradual's pool of candidate layers and its fresh
    # layers, the resume state, one layer of the query pass): 8 of the model's 24.
    assert peak <= prefill_peak + 8 * one_layer_kv, (peak, prefill_peak, one_layer_kv)
