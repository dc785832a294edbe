"""Cache-Craft's steps around fusion: before, the chunks whose context has a repaired
variant take it and every chunk gets its hint; after, the measured deviations are kept
and the new variants stored under their context."""

from __future__ import annotations

from collections.abc import Sequence

from ragcache.blending.cachecraft import CacheCraft, ChunkHint
from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.layer_pipeline import StreamedChunk
from ragcache.blending.prompt import PromptLayout
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.service.chunk_cache import ChunkCache, chunk_kv_from_entry


def apply_variants(
    cache: ChunkCache,
    method: CacheCraft,
    layout: PromptLayout,
    kvs: Sequence[ChunkKV | StreamedChunk],
    exact_chunks: int,
    target: EngineTarget,
) -> list[ChunkKV | StreamedChunk]:
    """``kvs`` with the variants of this prompt's contexts in place; sets the hints."""
    keys = [cache.key(ids) for ids in layout.chunk_ids]
    out: list[ChunkKV | StreamedChunk] = list(kvs)
    hints = [ChunkHint() for _ in kvs]
    for index in range(max(1, exact_chunks), len(kvs)):
        known = cache.variants.deviation(keys[index])
        if known is not None:
            hints[index] = ChunkHint(False, known.contexts, known.mean)
        entry = cache.variants.get(keys[index], keys[:index], layout.chunk_ids[index])
        if entry is not None:
            out[index] = chunk_kv_from_entry(entry, target, lossless=False)
            hints[index].variant = True
    method.hints = hints
    return out


def record_variants(cache: ChunkCache, method: CacheCraft, layout: PromptLayout) -> int:
    """Keeps the deviations the fusion measured and stores its repaired variants;
    returns how many variants were stored."""
    keys = [cache.key(ids) for ids in layout.chunk_ids]
    for index, deviation in method.deviations.items():
        cache.variants.observe(keys[index], deviation)
    stored = 0
    for index, variant in method.variants.items():
        kv = variant.kv
        layers = list(zip(kv.k, kv.v, strict=True))
        positions = kv.positions.tolist()
        ids = layout.chunk_ids[index]
        if cache.variants.put(
            keys[index], keys[:index], ids, layers, positions, variant.repaired_tokens
        ):
            stored += 1
    return stored
