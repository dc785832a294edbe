"""Exact path KV: a chunk computed after the root and the chunks before it."""

from __future__ import annotations

import torch

from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.blending.exact_path import encode_after
from ragcache.engine.loader import LoadedModel
from tests.blending.test_fusion import random_layout


def test_path_kv_equals_a_fresh_prefill_of_the_ordered_chunks(engine_model: LoadedModel) -> None:
    layout = random_layout(3, seed=3)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    whole = ChunkEncoder(engine_model.model, [])._encode_batch([layout.prompt_ids])[0]
    path = encode_after(engine_model.model, encoder.root, [], layout.chunk_ids)
    for chunk, start in zip(path, layout.chunk_starts, strict=True):
        end = start + chunk.num_tokens
        assert chunk.positions.tolist() == list(range(start, end))
        for layer in range(engine_model.spec.num_layers):
            assert torch.allclose(chunk.k[layer], whole.k[layer][start:end], atol=1e-4)
            assert torch.allclose(chunk.v[layer], whole.v[layer][start:end], atol=1e-4)


def test_extending_a_cached_path_computes_only_the_new_chunks(engine_model: LoadedModel) -> None:
    layout = random_layout(3, seed=4)
    encoder = ChunkEncoder(engine_model.model, layout.root_ids)
    at_once = encode_after(engine_model.model, encoder.root, [], layout.chunk_ids)
    first = encode_after(engine_model.model, encoder.root, [], layout.chunk_ids[:1])
    rest = encode_after(engine_model.model, encoder.root, first, layout.chunk_ids[1:])
    for one, other in zip(at_once, first + rest, strict=True):
        assert one.positions.tolist() == other.positions.tolist()
        for layer in range(engine_model.spec.num_layers):
            assert torch.allclose(one.k[layer], other.k[layer], atol=1e-4)
            assert torch.allclose(one.v[layer], other.v[layer], atol=1e-4)
    alone = encoder.encode(layout.chunk_ids[:1])[0]
    assert torch.allclose(alone.v[-1], first[0].v[-1], atol=1e-4), "a root child is its path's head"
