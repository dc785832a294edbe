"""CacheFocus: relevance scores, pruning, positional allocation and windows that overflow."""

from __future__ import annotations

import random

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.focus import (
    CacheFocus,
    ContextTooLongError,
    FocusParameterError,
    choose_chunks,
    chunk_relevance,
)
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.placement import reposition
from ragcache.blending.prompt import PromptLayout
from ragcache.blending.registry import make_method
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from ragcache.evaluation.fusion_eval import parse_settings
from ragcache.kernels.rope import apply_rope_ref, rope_cos_sin
from tests.blending.test_fusion import chunk_kv_at, random_layout


def encoded(loaded: LoadedModel, layout: PromptLayout) -> tuple[ChunkEncoder, list[ChunkKV]]:
    encoder = ChunkEncoder(loaded.model, layout.root_ids)
    return encoder, encoder.encode(layout.chunk_ids)


def focused(
    loaded: LoadedModel, layout: PromptLayout, **params: float | str
) -> tuple[FusedRequest, list[float]]:
    """The fused request of cachefocus with ``params``, and the chunks' relevance."""
    encoder, chunks = encoded(loaded, layout)
    method = make_method("cachefocus", **params)
    layers = int(params.get("layers", 2))
    relevance = chunk_relevance(loaded.model, layout, encoder.root, chunks, layers)
    return fuse(loaded.model, layout, encoder.root, chunks, method), relevance.chunks.tolist()


def direct_first_layer_shares(loaded: LoadedModel, layout: PromptLayout) -> torch.Tensor:
    """Layer 0 by hand: each query token's softmax over the cached context (every chunk
    at the positions it was encoded at, right after the root) and the query tokens up to
    itself, per head, then averaged over heads and query tokens."""
    model, spec = loaded.model, loaded.spec
    encoder, chunks = encoded(loaded, layout)
    first = len(layout.root_ids) + max(len(ids) for ids in layout.chunk_ids)
    layer = model.layers[0]
    hidden = layer.input_layernorm(model.embed(torch.tensor(layout.query_ids)))
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    with torch.inference_mode():
        q, k, _ = layer.self_attn.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
    cos, sin = rope_cos_sin(torch.arange(first, first + len(layout.query_ids)), model.inv_freq)
    q = apply_rope_ref(q.reshape(-1, spec.num_heads, spec.head_dim), cos, sin)
    k = apply_rope_ref(k.reshape(-1, spec.num_kv_heads, spec.head_dim), cos, sin)
    keys = torch.cat([encoder.root.k[0], *(chunk.k[0] for chunk in chunks), k])
    group = spec.num_heads // spec.num_kv_heads
    shares = torch.zeros(len(keys))
    for i in range(len(layout.query_ids)):
        visible = keys[: layout.context_end + i + 1]
        for head in range(spec.num_heads):
            logits = visible[:, head // group] @ q[i, head] / spec.head_dim**0.5
            shares[: len(visible)] += torch.softmax(logits, dim=0)
    return shares / (len(layout.query_ids) * spec.num_heads)


def test_relevance_is_the_querys_attention_share(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=1)
    encoder, chunks = encoded(engine_model, layout)
    shares = direct_first_layer_shares(engine_model, layout)
    first = chunk_relevance(engine_model.model, layout, encoder.root, chunks, 1)
    expected = torch.stack(
        [
            shares[s : s + len(ids)].sum()
            for s, ids in zip(layout.chunk_starts, layout.chunk_ids, strict=True)
        ]
    )
    assert torch.allclose(first.chunks, expected, atol=1e-5)
    assert int(first.chunks.argmax()) == int(expected.argmax())
    assert first.root == pytest.approx(float(shares[: len(layout.root_ids)].sum()), abs=1e-5)
    two = chunk_relevance(engine_model.model, layout, encoder.root, chunks, 2)
    assert two.chunks.shape == (4,) and bool((two.chunks > 0).all())
    assert float(two.chunks.sum()) + two.root + two.query == pytest.approx(1.0, abs=1e-5)


def test_relevance_follows_the_chunk_not_its_place(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=9)
    reversed_layout = PromptLayout(layout.root_ids, layout.chunk_ids[::-1], layout.query_ids)
    scores = []
    for each in (layout, reversed_layout):
        encoder, chunks = encoded(engine_model, each)
        scores.append(chunk_relevance(engine_model.model, each, encoder.root, chunks, 2).chunks)
    assert torch.allclose(scores[0], scores[1].flip(0), atol=1e-5)


def test_keep_all_as_retrieved_is_full_reuse(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=2)
    encoder, chunks = encoded(engine_model, layout)
    reuse = fuse(engine_model.model, layout, encoder.root, chunks, make_method("full_reuse"))
    focus = fuse(engine_model.model, layout, encoder.root, chunks, make_method("cachefocus"))
    assert focus.prompt_ids == reuse.prompt_ids and focus.placed and reuse.placed
    mine_kv = [*focus.placed.k, *focus.placed.v]
    for mine, theirs in zip(mine_kv, [*reuse.placed.k, *reuse.placed.v], strict=True):
        assert torch.equal(mine, theirs)
    assert focus.placed.recompute == reuse.placed.recompute == []
    assert focus.report.pruned_chunks == [] and focus.report.chunk_order == [0, 1, 2, 3]
    assert focus.report.reused_tokens == reuse.report.reused_tokens


def test_pruning_keeps_the_most_relevant_chunks_compacted(engine_model: LoadedModel) -> None:
    layout = random_layout(5, seed=3)
    fused, scores = focused(engine_model, layout, keep=0.5)
    ranked = sorted(range(5), key=lambda i: -scores[i])
    kept = sorted(ranked[:3])  # ceil(0.5 * 5)
    report = fused.report
    assert report.chunk_order == kept and report.pruned_chunks == sorted(ranked[3:])
    assert report.pruned_tokens == sum(len(layout.chunk_ids[i]) for i in ranked[3:])
    assert report.reused_tokens + report.pruned_tokens == report.context_tokens
    chunk_ids = [layout.chunk_ids[i] for i in kept]
    compact = PromptLayout(layout.root_ids, chunk_ids, layout.query_ids)
    assert fused.prompt_ids == compact.prompt_ids
    _, cached = encoded(engine_model, compact)
    assert fused.placed is not None
    for start, ids, chunk in zip(compact.chunk_starts, chunk_ids, cached, strict=True):
        span = slice(start, start + len(ids))
        fresh = chunk_kv_at(engine_model, ids, start)[0]  # layer 0 sees no other token
        assert (fused.placed.k[0][span] - fresh).abs().max() <= 1e-5
        moved = reposition(chunk, start, engine_model.model.inv_freq)
        for layer in range(engine_model.spec.num_layers):
            assert torch.allclose(fused.placed.k[layer][span], moved[layer], atol=1e-6)
            assert torch.equal(fused.placed.v[layer][span], chunk.v[layer])


def test_relevance_order_puts_the_most_relevant_last(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=4)
    fused, scores = focused(engine_model, layout, order="relevance")
    order = fused.report.chunk_order
    assert sorted(order) == [0, 1, 2, 3] and order[-1] == max(range(4), key=scores.__getitem__)
    assert [scores[i] for i in order] == sorted(scores)
    assert fused.prompt_ids[-len(layout.query_ids) - len(layout.chunk_ids[order[-1]]) :] == (
        layout.chunk_ids[order[-1]] + layout.query_ids
    )


def test_at_least_one_chunk_is_kept(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=5)
    fused, scores = focused(engine_model, layout, keep=0.01)
    assert fused.report.chunk_order == [max(range(4), key=scores.__getitem__)]
    assert choose_chunks([0.1, 0.0, 0.3], [5, 5, 5], 1e-6, 100) == [2]
    assert choose_chunks([0.1, 0.0, 0.3], [5, 5, 50], 1.0, 11) == [0, 1]
    with pytest.raises(ContextTooLongError, match="no retrieved chunk fits"):
        choose_chunks([0.1, 0.2], [20, 30], 1.0, 10)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"keep": 0.0}, "keep"),
        ({"keep": 1.5}, "keep"),
        ({"keep": "half"}, "keep"),
        ({"layers": 0.0}, "layers"),
        ({"layers": 1.5}, "layers"),
        ({"order": "random"}, "order"),
        ({"base": "cachefocus"}, "base"),
        ({"base": "magic"}, "base"),
    ],
)
def test_bad_parameters_name_themselves(params: dict[str, float | str], param: str) -> None:
    with pytest.raises(FocusParameterError, match=param) as caught:
        make_method("cachefocus", **params)
    assert caught.value.param == param


def test_layers_beyond_the_model_and_bad_settings_are_refused(engine_model: LoadedModel) -> None:
    layout = random_layout(3, seed=6)
    encoder, chunks = encoded(engine_model, layout)
    with pytest.raises(FocusParameterError, match="exceeds the model's 3 layers"):
        fuse(engine_model.model, layout, encoder.root, chunks, CacheFocus(keep=0.5, layers=4))
    with pytest.raises(ValueError, match="order='best' is not one of retrieved, relevance"):
        parse_settings(["cachefocus:order=best"])
    (setting,) = parse_settings(["cachefocus:keep=0.5,order=relevance,base=cacheblend"])
    assert setting.label == "cachefocus-0.5-relevance-cacheblend"
    assert setting.params == {"keep": 0.5, "order": "relevance", "base": "cacheblend"}


def test_base_method_repairs_the_focused_prompt(engine_model: LoadedModel) -> None:
    layout = random_layout(4, seed=7)
    fused, _ = focused(engine_model, layout, keep=0.5, base="cacheblend", ratio=0.2)
    kept = sum(len(layout.chunk_ids[i]) for i in fused.report.chunk_order)
    assert fused.report.recomputed_tokens == round(0.2 * kept)
    assert fused.report.reused_tokens == kept - fused.report.recomputed_tokens


def test_a_context_longer_than_the_window_is_pruned_to_fit(engine_model: LoadedModel) -> None:
    rng = random.Random(8)
    chunks = [[rng.randrange(3, 512) for _ in range(rng.randint(700, 900))] for _ in range(6)]
    layout = PromptLayout([1, 7, 9, 11], chunks, [rng.randrange(3, 512) for _ in range(9)])
    window = engine_model.spec.max_position
    assert len(layout) > window
    encoder, cached = encoded(engine_model, layout)
    fused = fuse(engine_model.model, layout, encoder.root, cached, CacheFocus())
    report = fused.report
    assert report.pruned_chunks and len(fused.prompt_ids) < window
    room = window - 1 - len(layout.root_ids) - len(layout.query_ids)
    kept = sum(len(chunks[i]) for i in report.chunk_order)
    assert all(kept + len(chunks[i]) > room for i in report.pruned_chunks)
    engine = Engine(engine_model, EngineConfig(kv_cache_bytes=8 << 20, block_size=16))
    seq = engine.add_request(fused.prompt_ids, SamplingParams(max_tokens=1), placed=fused.placed)
    while engine.has_unfinished():
        engine.step()
    assert len(seq.output_ids) == 1
