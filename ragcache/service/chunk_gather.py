"""The KV of a query's retrieved chunks: cached copies read while missing ones are encoded.

Reading a chunk from a slower tier (LMDB: read, checksum, decode) and encoding a missing
chunk on the engine thread need different resources. With overlap on they run at the
same time: as soon as retrieval has named the chunks, the engine encodes every missing
chunk (the same calls, on the same chunks in the same order, as the sequential path
makes) while this thread reads the cached ones. The KV is identical either way;
only the waiting differs. A chunk that was cached when looked up but gone when read
(evicted in between) is encoded afterwards, as the sequential path would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor, wait
from dataclasses import dataclass

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.layer_pipeline import StreamedChunk

# A cached chunk's KV (whole, or its layers still streaming from the tier) and its tier.
Hit = tuple[ChunkKV | StreamedChunk, str]
Fetch = Callable[[list[int]], Hit | None]
Encode = Callable[[list[list[int]]], list[ChunkKV]]


@dataclass(slots=True)
class GatheredKV:
    """Per chunk, in retrieval order: its cache hit (None when it was computed now)."""

    hits: list[Hit | None]
    kvs: list[ChunkKV | StreamedChunk]
    computed: list[ChunkKV]
    fetch_s: float  # spent reading the cached chunks
    compute_s: float  # spent encoding the missing chunks (concurrent with reading when overlapped)
    wall_s: float  # from the start until every chunk's KV was in hand


def gather_sequential(chunks: list[list[int]], fetch: Fetch, encode: Encode) -> GatheredKV:
    """Read every cached chunk, then encode the missing ones."""
    began = time.perf_counter()
    hits = [fetch(ids) for ids in chunks]
    fetched = time.perf_counter()
    missing = [ids for ids, hit in zip(chunks, hits, strict=True) if hit is None]
    computed = encode(missing) if missing else []
    done = time.perf_counter()
    return _assemble(hits, computed, fetched - began, done - fetched, done - began)


def gather_overlapped(
    chunks: list[list[int]],
    is_cached: Callable[[list[int]], bool],
    fetch: Fetch,
    encode: Encode,
    pool: Executor,
) -> GatheredKV:
    """Encode the chunks not cached on the engine thread while reading the cached ones."""
    began = time.perf_counter()
    cached = [is_cached(ids) for ids in chunks]
    missing = [ids for ids, known in zip(chunks, cached, strict=True) if not known]
    encoding = pool.submit(_timed, encode, missing) if missing else None
    try:
        # The missing chunks are looked up too, so the store counts their misses as the
        # sequential path does; a copy that appeared meanwhile is left for the encoded one.
        found = [fetch(ids) for ids in chunks]
    except BaseException:
        if encoding is not None:
            wait([encoding])  # the engine call ends before the error goes up
        raise
    hits = [hit if known else None for hit, known in zip(found, cached, strict=True)]
    fetched = time.perf_counter()
    first, compute_s = encoding.result() if encoding is not None else ([], 0.0)
    gone = [
        ids for ids, known, hit in zip(chunks, cached, hits, strict=True) if known and hit is None
    ]
    late, late_s = _timed(encode, gone) if gone else ([], 0.0)
    done = time.perf_counter()
    # Encoded KV in chunk order: the missing ones from the first call, the evicted ones after.
    first_it, late_it = iter(first), iter(late)
    computed = [
        next(first_it) if not known else next(late_it)
        for known, hit in zip(cached, hits, strict=True)
        if hit is None
    ]
    return _assemble(hits, computed, fetched - began, compute_s + late_s, done - began)


def _timed(encode: Encode, chunks: list[list[int]]) -> tuple[list[ChunkKV], float]:
    began = time.perf_counter()
    kvs = encode(chunks)
    return kvs, time.perf_counter() - began


def _assemble(
    hits: list[Hit | None],
    computed: list[ChunkKV],
    fetch_s: float,
    compute_s: float,
    wall_s: float,
) -> GatheredKV:
    new = iter(computed)
    kvs = [next(new) if hit is None else hit[0] for hit in hits]
    return GatheredKV(hits, kvs, computed, fetch_s, compute_s, wall_s)
