"""RagCache: the query pipeline as plain calls, usable without HTTP.

retrieve -> chunk KV from the store (missing chunks computed, and stored unless
service.kv_precompute is off) -> fuse -> engine. Model compute runs on the engine's
loop thread between decoding steps, never beside them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.fuser import FusedRequest, FusionReport, fuse
from ragcache.blending.methods import METHOD_NAMES, make_method
from ragcache.chunk_cache import ChunkCache
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.store import ChunkStore
from ragcache.config import Config
from ragcache.corpus_store import ChunkRecord, CorpusInfo, CorpusStore, DocumentRecord
from ragcache.data_manifest import Manifest, open_manifest
from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from ragcache.ingest import (
    FileSource,
    Ingestor,
    IngestResult,
    Progress,
    no_progress,
    parse_documents,
    read_sources,
)
from ragcache.jobs import Job, JobRunner
from ragcache.prompt import PromptBuilder, PromptLayout
from ragcache.query_result import CacheUsage, QueryResult, SourceChunk
from ragcache.retriever.chunker import Chunker
from ragcache.retriever.embedder import Embedder, SentenceTransformerEmbedder
from ragcache.retriever.retriever import Retriever
from ragcache.service_config import KV_PRECOMPUTE_MODES
from ragcache.service_errors import (
    InvalidInputError,
    InvalidParameterError,
    NotFoundError,
    PromptTooLongError,
    ServiceError,
)

_PARAM_IN_MESSAGE = re.compile(r"sampling parameter (\w+)=")


@dataclass(slots=True)
class PreparedQuery:
    prompt_ids: list[int]
    fused: FusedRequest
    sources: list[SourceChunk]
    usage: CacheUsage
    sampling: SamplingParams
    timings: dict[str, float | None]


class RagCache:
    def __init__(
        self,
        data_dir: str | Path | None = None,
        config: Config | None = None,
        *,
        loaded: LoadedModel | None = None,
        engine: Engine | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.config = config or Config()
        if data_dir is not None:
            self.config.data_dir = str(data_dir)
        service = self.config.service
        if service.kv_precompute not in KV_PRECOMPUTE_MODES:
            raise InvalidParameterError(
                f"service.kv_precompute={service.kv_precompute!r}; use one of "
                f"{', '.join(KV_PRECOMPUTE_MODES)}",
                "service.kv_precompute",
            )
        if engine is None:
            engine = Engine(loaded or load_model(self.config.model), self.config.engine)
        self.engine = engine
        self.loaded = engine.loaded
        if self.loaded.tokenizer is None:
            raise InvalidParameterError("the model has no tokenizer; RAG needs one", "model.path")
        self.embedder = embedder or SentenceTransformerEmbedder.from_config(self.config.retriever)
        self.data_dir = self.config.data_path
        open_manifest(
            self.data_dir,
            Manifest(
                self.loaded.name,
                self.loaded.fingerprint,
                self.config.retriever.embedder,
                self.embedder.dim,
            ),
        )
        self.prompts = PromptBuilder(self.loaded.tokenizer, service.system_prompt)
        self.chunker = Chunker.from_config(self.loaded.tokenizer, self.config.retriever)
        self.corpora = CorpusStore(self.data_dir, self.embedder.dim, self.config.retriever)
        context = KeyContext(
            self.loaded.fingerprint, str(self.loaded.dtype), self.config.chunkstore.disk_codec
        )
        store = ChunkStore(self.config.chunkstore, self.data_dir / "chunks")
        self.chunk_cache = ChunkCache(store, context, self.prompts.root_ids)
        self.async_engine = AsyncEngine(self.engine)
        self.encoder: ChunkEncoder = self.async_engine.run_sync(
            lambda e: ChunkEncoder(e.model, self.prompts.root_ids, e.config.block_size)
        )
        precompute = self._precompute_kv if service.kv_precompute == "eager" else None
        self.ingestor = Ingestor(
            self.corpora, self.chunker, self.embedder, precompute, self.prompts.separator_ids
        )
        self.jobs = JobRunner(service.job_history)

    def close(self) -> None:
        self.jobs.shutdown()
        self.async_engine.shutdown()
        self.chunk_cache.close()
        self.corpora.close()

    def __enter__(self) -> RagCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- corpora and documents -------------------------------------------------------

    def create_corpus(self, name: str, description: str = "") -> CorpusInfo:
        return self.corpora.create(name, description)

    def list_corpora(self) -> list[CorpusInfo]:
        return self.corpora.list()

    def get_corpus(self, name: str) -> CorpusInfo:
        return self.corpora.get(name)

    def delete_corpus(self, name: str) -> None:
        self.corpora.delete(name)

    def list_documents(self, corpus: str) -> list[DocumentRecord]:
        return self.corpora.documents(corpus)

    def ingest(
        self,
        sources: Sequence[FileSource],
        corpus: str,
        *,
        create: bool = False,
        progress: Progress = no_progress,
    ) -> IngestResult:
        """Adds files (paths, folders or (bytes, filename) pairs) to a corpus."""
        documents = parse_documents(read_sources(sources))
        if create and corpus not in {c.name for c in self.corpora.list()}:
            self.corpora.create(corpus)
        return self.ingestor.ingest(corpus, documents, progress)

    def submit_ingest(self, sources: Sequence[FileSource], corpus: str) -> Job:
        """Validates the files now and ingests them in the background; returns the job."""
        self.corpora.get(corpus)
        documents = parse_documents(read_sources(sources))

        def work(progress: Progress) -> dict[str, Any]:
            result = self.ingestor.ingest(corpus, documents, progress)
            return {
                "added": result.added,
                "replaced": result.replaced,
                "skipped": result.skipped,
                "chunks_added": result.chunks_added,
                "kv_chunks_computed": result.kv_chunks_computed,
                "seconds": result.seconds,
            }

        return self.jobs.submit("ingest", corpus, work)

    def delete_document(self, corpus: str, doc_id: str) -> None:
        with self.corpora.write_lock:
            change = self.corpora.begin_change(corpus)
            record = self.corpora.document(corpus, doc_id)
            if record is None:
                raise NotFoundError(f"document {doc_id!r} is not in corpus {corpus!r}", "doc_id")
            change.removed.append(record)
            change.index.remove(record.chunk_ids)
            self.corpora.commit(change)

    def _precompute_kv(self, chunks: list[list[int]], progress: Progress) -> int:
        todo: list[list[int]] = []
        for ids in chunks:
            if ids not in todo and not self.chunk_cache.contains(ids):
                todo.append(ids)
        budget = self.config.service.kv_batch_tokens
        done = 0
        while done < len(todo):
            progress("kv", done, len(todo))
            batch, tokens = [], 0
            for ids in todo[done:]:
                if batch and tokens + len(ids) > budget:
                    break
                batch.append(ids)
                tokens += len(ids)
            kvs = self.async_engine.run_sync(lambda e, b=batch: self.encoder.encode(b))
            for kv in kvs:
                self.chunk_cache.put(kv)
            done += len(batch)
        progress("kv", done, len(todo))
        return len(todo)

    # ---- retrieval and queries ---------------------------------------------------------

    def retrieve(self, text: str, corpus: str, k: int | None = None) -> list[SourceChunk]:
        return self._retrieve(text, corpus, self._check_k(k))[0]

    def _check_k(self, k: int | None) -> int:
        k = self.config.retriever.top_k if k is None else k
        limit = self.config.service.max_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise InvalidParameterError(f"k={k!r} is invalid; expected 1 to {limit}", "k")
        return k

    def _retrieve(
        self, text: str, corpus: str, k: int
    ) -> tuple[list[SourceChunk], list[ChunkRecord]]:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("the query text is empty; send a question", "query")
        retriever = Retriever(self.embedder, self.corpora.index(corpus), self.config.retriever)
        hits = retriever.retrieve(text, k)
        records = self.corpora.chunks(corpus, [hit.chunk_id for hit in hits])
        sources, found = [], []
        for hit, record in zip(hits, records, strict=True):
            if record is None:
                continue
            found.append(record)
            sources.append(
                SourceChunk(
                    record.chunk_id,
                    record.doc_id,
                    record.text,
                    hit.score,
                    record.char_start,
                    record.char_end,
                    record.source,
                )
            )
        return sources, found

    def query(self, text: str, corpus: str, **options: Any) -> QueryResult:
        """Answers a question from a corpus; options as for ``stream_query``."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.aquery(text, corpus, **options))
        raise RuntimeError("RagCache.query was called inside an event loop; await aquery")

    async def aquery(self, text: str, corpus: str, **options: Any) -> QueryResult:
        result: QueryResult | None = None
        async for event in self.stream_query(text, corpus, **options):
            if isinstance(event, QueryResult):
                result = event
        assert result is not None
        return result

    async def stream_query(
        self,
        text: str,
        corpus: str,
        k: int | None = None,
        method: str | None = None,
        method_params: dict[str, float] | None = None,
        sampling: SamplingParams | None = None,
    ) -> AsyncIterator[str | QueryResult]:
        """Answer text pieces as they decode, then the QueryResult."""
        began = time.perf_counter()
        prepared = await asyncio.to_thread(
            self._prepare, text, corpus, k, method, method_params or {}, sampling
        )
        fused = prepared.fused
        submitted = time.perf_counter()
        first: float | None = None
        last = None
        try:
            async for out in self.async_engine.stream(
                fused.prompt_ids,
                prepared.sampling,
                placed=fused.placed,
                use_prefix_cache=fused.use_prefix_cache,
            ):
                if out.finish_reason == "error":
                    raise PromptTooLongError(out.error or "the engine refused the prompt", "k")
                if first is None and out.token_ids:
                    first = time.perf_counter()
                last = out
                if out.new_text:
                    yield out.new_text
        except InvalidRequestError as error:
            raise InvalidInputError(str(error)) from None
        finished = time.perf_counter()
        assert last is not None
        prepared.usage.engine_cached_tokens = last.num_cached_tokens
        timings = prepared.timings
        timings["prefill"] = None if first is None else first - submitted
        timings["decode"] = None if first is None else finished - first
        timings["ttft"] = None if first is None else first - began
        timings["total"] = finished - began
        yield QueryResult(
            last.text,
            last.finish_reason,
            prepared.sources,
            prepared.usage,
            timings,
            len(fused.prompt_ids),
            len(last.token_ids),
        )

    def _sampling(self, sampling: SamplingParams | None) -> SamplingParams:
        sampling = sampling or SamplingParams(max_tokens=self.config.service.max_tokens)
        try:
            return sampling.validate(self.loaded.spec.vocab_size)
        except InvalidRequestError as error:
            match = _PARAM_IN_MESSAGE.search(str(error))
            param = match.group(1) if match else "stop_token_ids"
            raise InvalidParameterError(str(error), param) from None

    def _method(self, name: str | None, params: dict[str, float]) -> tuple[Any, dict[str, float]]:
        fusion = self.config.fusion
        name = name or fusion.method
        if name not in METHOD_NAMES:
            raise InvalidParameterError(
                f"fusion method {name!r} is unknown; use one of {', '.join(METHOD_NAMES)}",
                "method",
            )
        known = {"recompute_ratio", "check_layer", "legolink_k"}
        unknown = set(params) - known
        if unknown:
            raise InvalidParameterError(
                f"unknown method parameter {sorted(unknown)[0]!r}; known: {sorted(known)}",
                sorted(unknown)[0],
            )
        ratio = float(params.get("recompute_ratio", fusion.recompute_ratio))
        check_layer = params.get("check_layer", fusion.check_layer)
        legolink_k = params.get("legolink_k", fusion.legolink_k)
        layers = self.loaded.spec.num_layers
        if not 0.0 <= ratio <= 1.0:
            raise InvalidParameterError(
                f"recompute_ratio={ratio} must be in [0, 1]", "recompute_ratio"
            )
        if not isinstance(check_layer, int) or not 0 <= check_layer < layers - 1:
            raise InvalidParameterError(
                f"check_layer={check_layer!r} must be an integer in [0, {layers - 2}]",
                "check_layer",
            )
        if not isinstance(legolink_k, int) or legolink_k < 0:
            raise InvalidParameterError(
                f"legolink_k={legolink_k!r} must be an integer >= 0", "legolink_k"
            )
        used = {"ratio": ratio, "check_layer": check_layer, "k": legolink_k}
        return make_method(name, **used), used

    def _prepare(
        self,
        text: str,
        corpus: str,
        k: int | None,
        method_name: str | None,
        method_params: dict[str, float],
        sampling: SamplingParams | None,
    ) -> PreparedQuery:
        sampling = self._sampling(sampling)
        method, params = self._method(method_name, method_params)
        k = self._check_k(k)
        began = time.perf_counter()
        sources, records = self._retrieve(text, corpus, k)
        retrieved = time.perf_counter()
        chunks = [record.token_ids + self.prompts.separator_ids for record in records]
        layout = self.prompts.layout(chunks, text)
        limit = self.engine.max_model_len
        if len(layout) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(layout)} tokens ({len(chunks)} retrieved chunks and "
                f"the question); this model and KV pool accept at most {limit - 1}: "
                "lower k or shorten the question",
                "k",
            )
        usage = CacheUsage(method.name)
        if method.name == "full_prefill":
            context = layout.context_end - len(layout.root_ids)
            report = FusionReport(method.name, context, 0, context, 0.0, params)
            fused = FusedRequest(layout.prompt_ids, None, False, report)
            fetched = computed = retrieved
        else:
            cached = self._fetch(chunks)
            fetched = time.perf_counter()
            for source, hit, ids in zip(sources, cached, chunks, strict=True):
                if hit is not None:
                    source.cache_tier = hit[1]
                    usage.tokens_by_tier[hit[1]] = usage.tokens_by_tier.get(hit[1], 0) + len(ids)
                else:
                    usage.computed_tokens += len(ids)
            fused, computed = self._fuse(layout, chunks, cached, method, params)
        usage.reused_tokens = fused.report.reused_tokens
        usage.recomputed_tokens = fused.report.recomputed_tokens
        timings: dict[str, float | None] = {
            "retrieval": retrieved - began,
            "cache_fetch": fetched - retrieved,
            "kv_compute": computed - fetched,
            "fusion": fused.report.prepare_s,
        }
        return PreparedQuery(layout.prompt_ids, fused, sources, usage, sampling, timings)

    def _fetch(self, chunks: list[list[int]]) -> list[tuple[ChunkKV, str] | None]:
        if self.config.service.kv_precompute == "off":
            return [None] * len(chunks)
        found: list[tuple[ChunkKV, str] | None] = []
        for ids in chunks:
            cached = self.chunk_cache.fetch(ids)
            found.append(None if cached.kv is None else (cached.kv, cached.tier or "?"))
        return found

    def _fuse(
        self,
        layout: PromptLayout,
        chunks: list[list[int]],
        cached: list[tuple[ChunkKV, str] | None],
        method: Any,
        params: dict[str, float],
    ) -> tuple[FusedRequest, float]:
        missing = [ids for ids, hit in zip(chunks, cached, strict=True) if hit is None]
        times: list[float] = []

        def compute_and_fuse(engine: Engine) -> tuple[list[ChunkKV], FusedRequest]:
            new = self.encoder.encode(missing) if missing else []
            times.append(time.perf_counter())
            it = iter(new)
            kvs = [next(it) if hit is None else hit[0] for hit in cached]
            return new, fuse(engine.model, layout, self.encoder.root, kvs, method, params)

        new, fused = self.async_engine.run_sync(compute_and_fuse)
        if self.config.service.kv_precompute != "off":
            for kv in new:
                self.chunk_cache.put(kv)
        return fused, times[0]

    # ---- cache -------------------------------------------------------------------------

    def cache_stats(self) -> dict[str, Any]:
        engine = self.async_engine.run_sync(lambda e: e.stats())
        return {
            "chunks": self.chunk_cache.stats(),
            "engine": engine,
            "corpora": len(self.corpora.list()),
        }

    def cache_clear(self) -> dict[str, Any]:
        before = self.chunk_cache.stats()
        self.chunk_cache.clear()
        tiers = before["tiers"]
        assert isinstance(tiers, dict)
        return {"entries_removed": max(t["entries"] for t in tiers.values()) if tiers else 0}


__all__ = ["QueryResult", "RagCache", "ServiceError"]
