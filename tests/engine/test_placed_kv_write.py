"""Placed KV written straight into the engine's slots equals the layer built whole."""

from __future__ import annotations

import itertools

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import fuse
from ragcache.blending.placement import PlacedContext
from ragcache.blending.registry import make_method
from ragcache.engine import model_runner
from ragcache.engine.loader import LoadedModel
from ragcache.engine.model_runner import slot_runs
from tests.blending.test_fusion import answer, chunk_kv_at, random_layout


def test_slot_runs_split_where_slots_stop_being_consecutive() -> None:
    assert slot_runs([8, 9, 10, 40, 41, 3], 5) == [
        (range(5, 8), 8),
        (range(8, 10), 40),
        (range(10, 11), 3),
    ]
    assert slot_runs([], 0) == []


def placed_context(loaded: LoadedModel, seed: int) -> PlacedContext:
    layout = random_layout(3, seed=seed)
    encoder = ChunkEncoder(loaded.model, layout.root_ids)
    parts = [encoder.root, *encoder.encode(layout.chunk_ids)]
    return PlacedContext.of(parts, [0, *layout.chunk_starts], loaded.model.inv_freq)


def test_filling_runs_of_rows_equals_the_whole_layer(engine_model: LoadedModel) -> None:
    placed = placed_context(engine_model, seed=3)
    end = placed.end
    layers = placed.num_layers
    fresh_k = [torch.randn(end, *placed.head_shape) for _ in range(2)]
    fresh_v = [torch.randn(end, *placed.head_shape) for _ in range(2)]
    picked = torch.tensor([1, 17, end - 2])
    overrides = {
        layer: (picked, torch.randn(3, *placed.head_shape), torch.randn(3, *placed.head_shape))
        for layer in (1, layers - 1)
    }
    repaired = placed.repaired(end - 4, 2, fresh_k, fresh_v, overrides)
    cuts = [0, 5, 29, 30, 61, repaired.end]  # runs that start and stop inside chunks
    for layer in range(layers):
        for lazy, whole in (
            (repaired.k, repaired.keys(layer)),
            (repaired.v, repaired.values(layer)),
        ):
            assert lazy.fill is not None
            out = torch.full_like(whole, float("nan"))
            for a, b in itertools.pairwise(cuts):
                lazy.fill(layer, range(a, b), out[a:b])
            assert torch.equal(out, whole), layer


@pytest.mark.parametrize(("source", "target"), [(0, 300), (250, 17)])
def test_placed_keys_equal_keys_computed_at_their_offset(
    engine_model: LoadedModel, source: int, target: int
) -> None:
    ids = random_layout(1, seed=6).chunk_ids[0]
    cached = chunk_kv_at(engine_model, ids, source)
    expected = chunk_kv_at(engine_model, ids, target)
    chunk = ChunkKV(ids, cached, cached, torch.arange(source, source + len(ids)))
    placed = PlacedContext.of([chunk], [target], engine_model.model.inv_freq)
    out = torch.empty(len(ids), *placed.head_shape)
    for layer in range(engine_model.spec.num_layers):
        placed.k.fill(layer, range(target, target + len(ids)), out)
        assert (out - expected[layer]).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["full_reuse", "cacheblend"])
def test_written_in_place_or_gathered_the_answer_is_the_same(
    engine_model: LoadedModel, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = random_layout(4, seed=11)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    chunks = encoder.encode(layout.chunk_ids)
    fused = fuse(engine_model.model, layout, encoder.root, chunks, make_method(method))
    in_place = answer(engine_model, layout, fused)
    monkeypatch.setattr(model_runner, "_MAX_FILL_RUNS", -1)  # always the gathered write
    gathered = answer(engine_model, layout, fused)
    assert in_place[0] == gathered[0]
    assert torch.equal(in_place[1], gathered[1])
