"""Fusion methods: exactness at their limits, re-positioning, and engine integration."""

from __future__ import annotations

import random

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.placement import reposition
from ragcache.blending.prompt import PromptLayout
from ragcache.blending.registry import METHOD_NAMES, make_method
from ragcache.engine.attention_metadata import contiguous_metadata
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.kv_pool import KVPool
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True, prompt_logprobs=True)


def random_layout(num_chunks: int, seed: int = 0) -> PromptLayout:
    rng = random.Random(seed)
    root = [rng.randrange(3, 512) for _ in range(11)]
    chunks = [
        [rng.randrange(3, 512) for _ in range(rng.randint(20, 45))] for _ in range(num_chunks)
    ]
    query = [rng.randrange(3, 512) for _ in range(9)]
    return PromptLayout(root, chunks, query)


def run(loaded: LoadedModel, layout: PromptLayout, method: str, **params: float):
    encoder = ChunkEncoder(loaded.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    fused = fuse(loaded.model, layout, encoder.root, chunks, make_method(method, **params))
    return (*answer(loaded, layout, fused), fused.report)


def answer(loaded: LoadedModel, layout: PromptLayout, fused: FusedRequest, params=PARAMS):
    """The engine's greedy answer to a fused request, and the query tokens' log-probs."""
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=8 << 20, block_size=8))
    seq = engine.add_request(
        fused.prompt_ids, params, placed=fused.placed, use_prefix_cache=fused.use_prefix_cache
    )
    while engine.has_unfinished():
        engine.step()
    query_lp = [seq.prompt_logprobs[i] for i in range(layout.context_end + 1, len(layout))]
    return seq.output_ids, torch.tensor(query_lp)


def test_cacheblend_full_ratio_reproduces_full_prefill(engine_model: LoadedModel) -> None:
    layout = random_layout(4)
    ref_tokens, ref_lp, _ = run(engine_model, layout, "full_prefill")
    tokens, lp, report = run(engine_model, layout, "cacheblend", ratio=1.0)
    assert report.recompute_fraction == 1.0
    assert tokens == ref_tokens
    assert torch.allclose(lp, ref_lp, atol=1e-4)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_is_exact_without_chunk_boundaries(
    engine_model: LoadedModel, method: str
) -> None:
    for num_chunks in (0, 1):
        layout = random_layout(num_chunks, seed=5)
        ref_tokens, ref_lp, _ = run(engine_model, layout, "full_prefill")
        tokens, lp, _ = run(engine_model, layout, method)
        assert tokens == ref_tokens
        assert torch.allclose(lp, ref_lp, atol=1e-4)


def test_full_reuse_differs_from_prefill_across_chunks(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=2)
    _, ref_lp, _ = run(engine_model, layout, "full_prefill")
    _, lp, report = run(engine_model, layout, "full_reuse")
    assert report.recomputed_tokens == 0
    assert not torch.allclose(lp, ref_lp, atol=1e-4)


def test_recompute_budgets_follow_parameters(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=3)
    context = layout.context_end - len(layout.root_ids)
    _, _, blend = run(engine_model, layout, "cacheblend", ratio=0.2)
    assert blend.recomputed_tokens == round(0.2 * context)
    _, _, lego = run(engine_model, layout, "legolink", k=8)
    assert lego.recomputed_tokens == 8 * 3


def chunk_kv_at(loaded: LoadedModel, ids: list[int], start: int) -> list[torch.Tensor]:
    """Keys of a chunk computed alone at positions start, start + 1, ..."""
    model = loaded.model
    meta = contiguous_metadata([len(ids)], 8)
    pool = KVPool(loaded.spec, (len(ids) + 7) // 8, 8, model.dtype)
    with torch.inference_mode():
        model(torch.tensor(ids), torch.arange(start, start + len(ids)), meta, pool)
    slots = torch.arange(len(ids))
    return [pool.read_slots(layer, slots)[0] for layer in range(loaded.spec.num_layers)]


@pytest.mark.parametrize(("source", "target"), [(0, 300), (250, 17), (40, 41)])
def test_repositioned_keys_equal_keys_computed_at_target(
    engine_model: LoadedModel, source: int, target: int
) -> None:
    ids = random_layout(1, seed=6).chunk_ids[0]
    cached = chunk_kv_at(engine_model, ids, source)
    expected = chunk_kv_at(engine_model, ids, target)
    positions = torch.arange(source, source + len(ids))
    chunk = ChunkKV(ids, cached, cached, positions)
    moved = reposition(chunk, target, engine_model.model.inv_freq)
    for layer in range(engine_model.spec.num_layers):
        assert (moved[layer] - expected[layer]).abs().max() <= 1e-5


def test_query_reads_equal_the_attention_of_a_full_prefill_without_boundaries(
    engine_model: LoadedModel,
) -> None:
    from ragcache.blending.gradual import attention_to_context, query_reads
    from ragcache.blending.methods import FusionContext
    from ragcache.blending.placement import PlacedContext
    from ragcache.blending.selection_pass import run_fresh_pass

    layout = random_layout(1, seed=7)  # one chunk: its cached KV is exact
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    placed = PlacedContext.of(
        [encoder.root, *chunks], [0, *layout.chunk_starts], engine_model.model.inv_freq
    )
    ctx = FusionContext(engine_model.model, layout, placed.k, placed.v)
    layers = engine_model.spec.num_layers
    reads = query_reads(ctx, layers)
    fresh = run_fresh_pass(engine_model.model, layout, layers)
    end = layout.context_end
    expected = torch.stack(
        [
            attention_to_context(fresh.query_q[i], fresh.k[i], torch.arange(end), end)
            for i in range(layers)
        ]
    ).mean(dim=0)
    assert reads.shape == (end,)
    assert torch.allclose(reads, expected, atol=1e-5)


def test_gradual_with_query_reads_keeps_its_budget_and_is_exact_at_full_ratio(
    engine_model: LoadedModel,
) -> None:
    layout = random_layout(4, seed=8)
    context = layout.context_end - len(layout.root_ids)
    _, _, report = run(engine_model, layout, "gradual", ratio=0.2, query_layers=2)
    assert report.recomputed_tokens == round(0.2 * context)
    ref_tokens, ref_lp, _ = run(engine_model, layout, "full_prefill")
    tokens, lp, _ = run(engine_model, layout, "gradual", ratio=1.0, query_layers=2)
    assert tokens == ref_tokens
    assert torch.allclose(lp, ref_lp, atol=1e-4)


def test_queryblend_is_gradual_weighted_by_reads_over_every_layer(
    engine_model: LoadedModel,
) -> None:
    layout = random_layout(4, seed=9)
    layers = engine_model.spec.num_layers
    named = make_method("queryblend", ratio=0.2)
    spelled = make_method("gradual", ratio=0.2, query_layers=layers, query_weight=2.0)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    plans = [fuse(engine_model.model, layout, encoder.root, chunks, m) for m in (named, spelled)]
    assert plans[0].placed is not None and plans[1].placed is not None
    assert plans[0].placed.recompute == plans[1].placed.recompute
    assert plans[0].report.method == "queryblend"


@pytest.mark.parametrize("method", ["gradual", "gradual_weighted", "queryblend"])
def test_gradual_recomputes_its_budget_at_every_legal_check_layer(
    engine_model: LoadedModel, method: str
) -> None:
    layout = random_layout(4, seed=5)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    context = layout.context_end - len(layout.root_ids)
    last_check = make_method(method).last_check  # type: ignore[attr-defined]
    for check_layer in range(1, engine_model.spec.num_layers - 1):
        fusion = make_method(method, ratio=0.2, check_layer=check_layer)
        fused = fuse(engine_model.model, layout, encoder.root, chunks, fusion)
        assert fused.placed is not None
        assert len(fused.placed.recompute) == round(0.2 * context), check_layer
        assert fused.report.selection_fraction > 0
        if check_layer >= last_check:
            break


def test_a_dropped_candidate_keeps_its_fresh_kv_at_the_layer_it_was_computed(
    engine_model: LoadedModel,
) -> None:
    layout = random_layout(4, seed=6)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    gradual = make_method("gradual", ratio=0.1)
    reuse = fuse(engine_model.model, layout, encoder.root, chunks, make_method("full_reuse"))
    fused = fuse(engine_model.model, layout, encoder.root, chunks, gradual)
    assert fused.placed is not None and reuse.placed is not None
    chosen = set(fused.placed.recompute)
    layer = 2  # computed for 3x the budget, a third of them kept
    changed = (fused.placed.v[layer] != reuse.placed.v[layer]).flatten(1).any(dim=1)
    refreshed = set(changed.nonzero().flatten().tolist())
    assert refreshed - chosen, "candidates dropped at layer 3 keep their layer-2 KV"
