"""Layer-pipelined loading gives the KV that reading whole entries first gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.layer_pipeline import StreamedChunk
from ragcache.blending.prompt import PromptLayout
from ragcache.blending.registry import make_method
from ragcache.chunkstore import ChunkStore, ChunkStoreConfig, KeyContext
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.engine.loader import LoadedModel
from ragcache.service.chunk_cache import ChunkCache
from tests.blending.test_fusion import random_layout

CONTEXT = KeyContext("tiny@pipeline", "float32", "raw", "", "")
SETTINGS = [
    ("full_reuse", {}),
    ("legolink", {"k": 4.0}),
    ("cacheblend", {"ratio": 0.3}),
    ("queryblend", {"ratio": 0.3}),
    ("cachefocus", {"keep": 0.67}),
]


def disk_cache(directory: Path, layout: PromptLayout, chunks: list[ChunkKV]) -> ChunkCache:
    config = ChunkStoreConfig(host_bytes=0, disk_initial_map_bytes=1 << 22)
    cache = ChunkCache(ChunkStore(config, directory), CONTEXT, layout.root_ids)
    for kv in chunks:
        assert cache.put(kv)
    return cache


def streamed(cache: ChunkCache, ids: list[int]) -> StreamedChunk:
    read = cache.read_layers(ids)
    assert read is not None and read.tier == "disk"
    return StreamedChunk(ids, read.positions, read.layers, cache.is_exact(read))


def assert_same_request(got: FusedRequest, want: FusedRequest) -> None:
    assert got.prompt_ids == want.prompt_ids
    assert got.use_prefix_cache == want.use_prefix_cache
    assert (got.placed is None) == (want.placed is None)
    if got.placed is None or want.placed is None:
        return
    assert got.placed.recompute == want.placed.recompute
    assert got.placed.exact_prefix == want.placed.exact_prefix
    for a, b in zip((*got.placed.k, *got.placed.v), (*want.placed.k, *want.placed.v), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("method", "params"), SETTINGS)
def test_pipelined_and_sequential_loading_give_identical_kv(
    engine_model: LoadedModel, tmp_path: Path, method: str, params: dict[str, float]
) -> None:
    model = engine_model.model
    layout = random_layout(3, seed=5)
    encoder = ChunkEncoder(model, layout.root_ids)
    cache = disk_cache(tmp_path / "chunks", layout, encoder.encode(layout.chunk_ids))
    target = EngineTarget.of(model)
    whole = []
    for ids in layout.chunk_ids:
        hit = cache.fetch(ids, target)
        assert hit.kv is not None
        whole.append(hit.kv)
    chosen = make_method(method, **params)
    sequential = fuse(model, layout, encoder.root, whole, chosen, params)
    parts = [streamed(cache, ids) for ids in layout.chunk_ids]

    def recompute(ids: list[int]) -> ChunkKV:
        raise AssertionError("no chunk was lost")

    pipelined = fuse(model, layout, encoder.root, parts, chosen, params, recompute=recompute)
    if method == "cachefocus":  # it reads whole chunks first; rotations compose in two steps
        assert pipelined.prompt_ids == sequential.prompt_ids
        assert pipelined.placed is not None and sequential.placed is not None
        for a, b in zip(pipelined.placed.k, sequential.placed.k, strict=True):
            assert torch.allclose(a, b, atol=1e-5)
    else:
        assert_same_request(pipelined, sequential)
    cache.close()


def test_a_chunk_evicted_between_lookup_and_read_is_recomputed(
    engine_model: LoadedModel, tmp_path: Path
) -> None:
    model = engine_model.model
    layout = random_layout(3, seed=6)
    encoder = ChunkEncoder(model, layout.root_ids)
    encoded = encoder.encode(layout.chunk_ids)
    cache = disk_cache(tmp_path / "chunks", layout, encoded)
    parts = [streamed(cache, ids) for ids in layout.chunk_ids]
    lost = layout.chunk_ids[1]
    assert cache.store.delete(cache.key(lost))  # gone after its lookup, before its read
    asked: list[list[int]] = []

    def recompute(ids: list[int]) -> ChunkKV:
        asked.append(ids)
        return encoder.encode([ids])[0]

    method = make_method("cacheblend", ratio=0.3)
    pipelined = fuse(model, layout, encoder.root, parts, method, recompute=recompute)
    assert asked == [lost]
    expected = fuse(model, layout, encoder.root, encoded, method)
    assert pipelined.placed is not None and expected.placed is not None
    assert pipelined.placed.recompute == expected.placed.recompute
    for a, b in zip(pipelined.placed.v, expected.placed.v, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    cache.close()


def test_streamed_chunks_without_a_recompute_are_refused(
    engine_model: LoadedModel, tmp_path: Path
) -> None:
    model = engine_model.model
    layout = random_layout(2, seed=7)
    encoder = ChunkEncoder(model, layout.root_ids)
    cache = disk_cache(tmp_path / "chunks", layout, encoder.encode(layout.chunk_ids))
    parts = [streamed(cache, ids) for ids in layout.chunk_ids]
    with pytest.raises(ValueError, match="recompute"):
        fuse(model, layout, encoder.root, parts, make_method("full_reuse"))
    cache.close()


def test_pipelined_loading_inside_inference_mode(engine_model: LoadedModel, tmp_path: Path) -> None:
    model = engine_model.model
    layout = random_layout(2, seed=8)
    encoder = ChunkEncoder(model, layout.root_ids)
    encoded = encoder.encode(layout.chunk_ids)
    cache = disk_cache(tmp_path / "chunks", layout, encoded)
    method = make_method("cacheblend", ratio=0.3)
    with torch.inference_mode():
        parts = [streamed(cache, ids) for ids in layout.chunk_ids]
        got = fuse(model, layout, encoder.root, parts, method, recompute=lambda ids: encoded[0])
    assert_same_request(got, fuse(model, layout, encoder.root, encoded, method))
    cache.close()
