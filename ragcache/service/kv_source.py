"""A view's chunk KV: cached copies from the chunk cache, missing chunks encoded on the
engine thread in calls of at most ``service.kv_batch_tokens`` tokens, and fusion.

Model calls for a query go through the ModelCallQueue, so other queries' calls fit
between them; ingest-time encoding runs straight on the engine thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Executor

from ragcache.blending.cachecraft import CacheCraft
from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.exact_path import encode_after
from ragcache.blending.fuser import FusedRequest, fuse
from ragcache.blending.layer_pipeline import StreamedChunk
from ragcache.blending.methods import FusionMethod, MethodParam
from ragcache.blending.prompt import PromptLayout
from ragcache.chunkstore.transfer import EngineTarget
from ragcache.config import ServiceConfig
from ragcache.corpus.progress import Progress
from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.engine import Engine
from ragcache.service.adapters import adapter_scope
from ragcache.service.chunk_cache import ChunkCache
from ragcache.service.chunk_gather import GatheredKV, gather_overlapped, gather_sequential
from ragcache.service.chunk_variants import apply_variants, record_variants
from ragcache.service.model_calls import ModelCallQueue, QueryCost


def token_batches(chunks: list[list[int]], budget: int) -> Iterator[list[list[int]]]:
    """Consecutive chunks in batches of at most ``budget`` tokens (a longer chunk alone)."""
    batch: list[list[int]] = []
    tokens = 0
    for ids in chunks:
        if batch and tokens + len(ids) > budget:
            yield batch
            batch, tokens = [], 0
        batch.append(ids)
        tokens += len(ids)
    if batch:
        yield batch


class ChunkKVSource:
    def __init__(
        self,
        chunk_cache: ChunkCache,
        encoder: ChunkEncoder,
        adapter_id: str | None,
        async_engine: AsyncEngine,
        model_calls: ModelCallQueue,
        pool: Executor,
        config: ServiceConfig,
    ) -> None:
        self.chunk_cache = chunk_cache
        self.encoder = encoder
        self.adapter_id = adapter_id
        self.async_engine = async_engine
        self.model_calls = model_calls
        self.pool = pool
        self.config = config
        self.target = EngineTarget.of(encoder.model)

    @property
    def stores(self) -> bool:
        return self.config.kv_precompute != "off"

    def fetch_one(self, ids: list[int]) -> tuple[StreamedChunk, str] | None:
        """A cached chunk looked up; its layers are read while fusion computes."""
        read = self.chunk_cache.read_layers(ids)
        if read is None:
            return None
        exact = self.chunk_cache.is_exact(read)
        return StreamedChunk(ids, read.positions, read.layers, exact), read.tier

    def query_cost(
        self, chunks: list[list[int]], layout: PromptLayout, received: float
    ) -> QueryCost:
        """Tokens whose KV is cached and tokens to compute: the order of its model calls."""
        cached = 0
        if self.stores:
            cached = sum(len(ids) for ids in chunks if self.chunk_cache.contains(ids))
        missing = sum(map(len, chunks)) - cached
        return QueryCost(len(layout.root_ids) + cached, missing + len(layout.query_ids), received)

    def gather(
        self, chunks: list[list[int]], cost: QueryCost, lossless_only: bool = False
    ) -> GatheredKV:
        """Every chunk's KV: cached copies read, missing chunks encoded, at the same time
        when service.overlap_kv is on. With ``lossless_only`` nothing is read where the
        cache may hand back KV that went through a lossy codec."""

        def encode(missing: list[list[int]]) -> list[ChunkKV]:
            return self.encode(missing, cost)

        if not self.stores or (lossless_only and not self.chunk_cache.keeps_exact_kv):
            return gather_sequential(chunks, lambda ids: None, encode)
        if self.config.overlap_kv:
            return gather_overlapped(
                chunks, self.chunk_cache.contains, self.fetch_one, encode, self.pool
            )
        return gather_sequential(chunks, self.fetch_one, encode)

    def encode(self, chunks: list[list[int]], cost: QueryCost) -> list[ChunkKV]:
        """KV of chunks computed after the root prompt, in the query's turn."""
        out: list[ChunkKV] = []
        for batch in token_batches(chunks, self.config.kv_batch_tokens):

            def encode(engine: Engine, batch: list[list[int]] = batch) -> list[ChunkKV]:
                with adapter_scope(engine, self.adapter_id):
                    return self.encoder.encode(batch)

            out.extend(self.model_calls.run(encode, cost))
        return out

    def precompute(self, chunks: list[list[int]], progress: Progress) -> int:
        """Encode and store every chunk not cached yet (ingest with kv_precompute=eager)."""
        todo: list[list[int]] = []
        for ids in chunks:
            if ids not in todo and not self.chunk_cache.contains(ids):
                todo.append(ids)
        done = 0
        for batch in token_batches(todo, self.config.kv_batch_tokens):
            progress("kv", done, len(todo))
            kvs = self.async_engine.run_sync(lambda e, b=batch: self.encoder.encode(b))
            for kv in kvs:
                self.chunk_cache.put(kv)
            done += len(batch)
        progress("kv", done, len(todo))
        return len(todo)

    def match_path(self, chunks: list[list[int]], min_length: int = 1) -> list[tuple[ChunkKV, str]]:
        """The exact KV (and tier) of the longest cached path of ``chunks``."""
        return self.chunk_cache.match_path(chunks, self.target, min_length) if self.stores else []

    def encode_path(
        self, prefix: list[ChunkKV], chunks: list[list[int]], cost: QueryCost
    ) -> list[ChunkKV]:
        """Exact KV of ``chunks`` after the root and ``prefix``, in the query's turn."""

        def encode(engine: Engine) -> list[ChunkKV]:
            with adapter_scope(engine, self.adapter_id):
                return encode_after(engine.model, self.encoder.root, prefix, chunks)

        return self.model_calls.run(encode, cost) if chunks else []

    def store_path(self, chunks: list[list[int]], start: int, kvs: list[ChunkKV]) -> None:
        if self.stores:
            self.chunk_cache.put_path(chunks, start, kvs)

    def fuse(
        self,
        layout: PromptLayout,
        kvs: Sequence[ChunkKV | StreamedChunk],
        method: FusionMethod,
        params: dict[str, MethodParam],
        cost: QueryCost,
        exact_chunks: int = 0,
        history: bool = True,
    ) -> FusedRequest:
        """Places and repairs the chunks; Cache-Craft reads what earlier requests left
        (variants, deviations) only with ``history``."""

        def place_and_repair(engine: Engine) -> FusedRequest:
            with adapter_scope(engine, self.adapter_id):
                root = self.encoder.root
                # A chunk its tier lost mid-read is computed here, on the engine thread.
                return fuse(
                    engine.model,
                    layout,
                    root,
                    kvs,
                    method,
                    params,
                    exact_chunks,
                    lambda ids: self.encoder.encode([ids])[0],
                )

        craft = method if isinstance(method, CacheCraft) and self.stores else None
        if craft is not None and history:
            kvs = apply_variants(self.chunk_cache, craft, layout, kvs, exact_chunks, self.target)
        fused = self.model_calls.run(place_and_repair, cost)
        if craft is not None:
            record_variants(self.chunk_cache, craft, layout)
        return fused
