"""The evaluation's chunk tiers hand back what they were given, through the engine target."""

from __future__ import annotations

import pytest
import torch

from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.engine.loader import LoadedModel
from ragcache.evaluation.chunk_tier import CHUNK_TIERS, ChunkTier
from tests.blending.test_fusion import random_layout


@pytest.mark.parametrize("tier", CHUNK_TIERS)
def test_a_tier_reads_back_the_chunks_of_the_current_example(
    engine_model: LoadedModel, tier: str
) -> None:
    layout = random_layout(3)
    encoded = ChunkEncoder(engine_model.model, layout.root_ids).encode(layout.chunk_ids)
    store = ChunkTier(tier, engine_model.fingerprint, "torch.float32", layout.root_ids)
    try:
        store.replace(encoded[:1])
        store.replace(encoded)  # an earlier example's chunks leave
        assert len(store.cache.store.tiers[1].keys()) == (3 if tier == "host" else 0)
        read = store.read(layout.chunk_ids, EngineTarget.of(engine_model.model))
        assert read.read_s > 0
        for got, want in zip(read.kvs, encoded, strict=True):
            for a, b in zip((*got.k, *got.v), (*want.k, *want.v), strict=True):
                if store.lossless:
                    assert torch.equal(a, b)
                else:  # int8 with per-token scales: close, not equal
                    assert torch.allclose(a, b, atol=0.05 * float(b.abs().max()))
            assert got.exact == store.lossless
    finally:
        store.close()


def test_an_unknown_tier_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="host, lmdb, lmdb-int8"):
        ChunkTier("ssd", "f", "torch.float32", [1])
