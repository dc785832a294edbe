"""Every tensor from a tier reaches the engine through EngineTarget.move.

The engine here computes in float64 while the tiers hold float32 KV (host memory, LMDB
raw, LMDB int8): a tier's copy that skipped the move would be float32 and fusion
refuses it. A recording target counts the moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import fuse
from ragcache.blending.prompt import PromptLayout
from ragcache.blending.registry import make_method
from ragcache.chunkstore import ChunkStore, ChunkStoreConfig, KeyContext
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.engine.loader import LoadedModel
from ragcache.service.chunk_cache import ChunkCache
from tests.blending.test_fusion import random_layout
from tests.conftest import loaded_from_hf, random_hf_model

CONTEXT = KeyContext("tiny@transfer", "float32", "raw", "", "")


class RecordingTarget(EngineTarget):
    """The engine's target, remembering every tensor it handed over."""

    moved: list[torch.Tensor]

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        object.__setattr__(self, "device", device)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "moved", [])

    def move(self, tensor: torch.Tensor) -> torch.Tensor:
        out = EngineTarget.move(self, tensor)
        self.moved.append(out)
        return out


@pytest.fixture(scope="module")
def models() -> tuple[LoadedModel, LoadedModel]:
    """The same weights in float32 (the tiers' dtype) and float64 (the engine's)."""
    hf = random_hf_model("llama")
    return loaded_from_hf(hf, dtype=torch.float32), loaded_from_hf(hf, dtype=torch.float64)


def tier_store(tier: str, directory: Path) -> ChunkStore:
    if tier == "host":
        return ChunkStore(ChunkStoreConfig(write_through=False), None)
    codec = "int8" if tier == "lmdb-int8" else "raw"
    config = ChunkStoreConfig(host_bytes=0, disk_codec=codec, disk_initial_map_bytes=1 << 22)
    return ChunkStore(config, directory)


def stored_chunks(
    store: ChunkStore, model32: LoadedModel, layout: PromptLayout
) -> tuple[ChunkCache, list[ChunkKV]]:
    cache = ChunkCache(store, CONTEXT, layout.root_ids)
    encoded = ChunkEncoder(model32.model, layout.root_ids).encode(layout.chunk_ids)
    for kv in encoded:
        assert cache.put(kv)
    return cache, encoded


@pytest.mark.parametrize("tier", ["host", "lmdb", "lmdb-int8"])
def test_a_float32_tier_feeds_a_float64_engine_through_the_target(
    models: tuple[LoadedModel, LoadedModel], tier: str, tmp_path: Path
) -> None:
    model32, model64 = models
    layout = random_layout(3)
    store = tier_store(tier, tmp_path / "chunks")
    cache, encoded = stored_chunks(store, model32, layout)
    target = RecordingTarget(model64.model.device, torch.float64)
    fetched = [cache.fetch(ids, target) for ids in layout.chunk_ids]
    expected_tier = "host" if tier == "host" else "disk"
    assert [hit.tier for hit in fetched] == [expected_tier] * 3
    kvs = [hit.kv for hit in fetched]
    assert all(kv is not None for kv in kvs)
    handed = {id(t) for kv in kvs if kv is not None for t in (*kv.k, *kv.v)}
    assert handed == {id(t) for t in target.moved}
    assert all(t.dtype == torch.float64 for t in target.moved)
    if tier != "lmdb-int8":
        for kv, ref in zip(kvs, encoded, strict=True):
            assert kv is not None
            assert all(torch.equal(a, b.double()) for a, b in zip(kv.k, ref.k, strict=True))
    root = ChunkEncoder(model64.model, layout.root_ids).root
    fused = fuse(model64.model, layout, root, [kv for kv in kvs if kv], make_method("cacheblend"))
    assert fused.placed is not None
    assert all(k.dtype == torch.float64 for k in fused.placed.k)
    store.close()


def test_fusion_refuses_a_tier_copy_that_skipped_the_target(
    models: tuple[LoadedModel, LoadedModel], tmp_path: Path
) -> None:
    model32, model64 = models
    layout = random_layout(2)
    store = tier_store("lmdb", tmp_path / "chunks")
    cache, _ = stored_chunks(store, model32, layout)
    raw = []
    for ids in layout.chunk_ids:
        entry = store.get(cache.key(ids), ids)
        assert entry is not None
        raw.append(
            ChunkKV(
                entry.token_ids,
                [k for k, _ in entry.layers],
                [v for _, v in entry.layers],
                torch.tensor(entry.positions),
            )
        )
    root = ChunkEncoder(model64.model, layout.root_ids).root
    with pytest.raises(ValueError, match=r"EngineTarget\.move"):
        fuse(model64.model, layout, root, raw, make_method("full_reuse"))
    store.close()


def test_the_target_leaves_a_tensor_already_in_place_untouched() -> None:
    target = EngineTarget(torch.device("cpu"), torch.float32)
    tensor = torch.ones(2, 3)
    assert target.move(tensor) is tensor
    moved = EngineTarget(torch.device("cpu"), torch.float64).move(tensor)
    assert moved.dtype == torch.float64 and torch.equal(moved, tensor.double())
