"""The tier an evaluation keeps its chunks in, read back the way a query reads them.

``host`` keeps the KV in host memory; ``lmdb`` and ``lmdb-int8`` keep it only in an
LMDB environment (raw bytes, or int8 with per-token scales), with no memory tier above
it, so every read goes to the record, checks it and decodes it. Reads go through the
service's ChunkCache, so every tensor reaches the engine through ``EngineTarget.move``:
whole entries before fusion (``read``), or layer by layer while fusion computes
(``stream``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ragcache.blending.chunk_kv import ChunkKV
from ragcache.blending.layer_pipeline import StreamedChunk
from ragcache.chunkstore.config import ChunkStoreConfig
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.store import ChunkStore
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.service.chunk_cache import ChunkCache

CHUNK_TIERS = ("host", "lmdb", "lmdb-int8")


@dataclass(slots=True)
class TierRead:
    kvs: list[ChunkKV]
    read_s: float


@dataclass(slots=True)
class TierStream:
    parts: list[StreamedChunk]
    lookup_s: float


class ChunkTier:
    """A chunk store holding an example's chunks in one tier."""

    def __init__(self, tier: str, fingerprint: str, kv_dtype: str, root_ids: list[int]) -> None:
        if tier not in CHUNK_TIERS:
            raise ValueError(f"chunk tier {tier!r} is not one of {', '.join(CHUNK_TIERS)}")
        self.tier = tier
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        codec = "int8" if tier == "lmdb-int8" else "raw"
        if tier == "host":
            store = ChunkStore(ChunkStoreConfig(write_through=False), None)
        else:
            self._directory = tempfile.TemporaryDirectory(prefix="ragcache-eval-tier-")
            config = ChunkStoreConfig(host_bytes=0, device_bytes=0, disk_codec=codec)
            store = ChunkStore(config, Path(self._directory.name))
        self.cache = ChunkCache(store, KeyContext(fingerprint, kv_dtype, codec), root_ids)

    @property
    def lossless(self) -> bool:
        return self.tier != "lmdb-int8"

    def replace(self, chunks: list[ChunkKV]) -> None:
        """Hold exactly ``chunks`` (an example's), nothing of earlier examples."""
        self.cache.clear()
        for kv in chunks:
            if not self.cache.put(kv):
                raise RuntimeError(f"the {self.tier} tier refused a chunk of {kv.num_tokens}")

    def read(self, chunk_ids: list[list[int]], target: EngineTarget) -> TierRead:
        """Every chunk's KV on ``target``, timed from the first lookup to the last tensor."""
        began = time.perf_counter()
        kvs = []
        for ids in chunk_ids:
            hit = self.cache.fetch(ids, target)
            if hit.kv is None:
                raise RuntimeError(f"the {self.tier} tier lost a chunk it was given")
            kvs.append(hit.kv)
        return TierRead(kvs, time.perf_counter() - began)

    def stream(self, chunk_ids: list[list[int]]) -> TierStream:
        """Every chunk looked up, its layers left to be read while fusion computes."""
        began = time.perf_counter()
        parts = []
        for ids in chunk_ids:
            read = self.cache.read_layers(ids)
            if read is None:
                raise RuntimeError(f"the {self.tier} tier lost a chunk it was given")
            parts.append(StreamedChunk(ids, read.positions, read.layers, self.cache.is_exact(read)))
        return TierStream(parts, time.perf_counter() - began)

    def close(self) -> None:
        self.cache.close()
        if self._directory is not None:
            self._directory.cleanup()
