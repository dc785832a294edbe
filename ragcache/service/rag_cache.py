"""RagCache: the query pipeline as plain calls, usable without HTTP.

retrieve -> chunk KV from the store (missing chunks computed, and stored unless
service.kv_precompute is off; with service.overlap_kv the reads and the encoding run at
the same time) -> fuse -> engine. Model compute runs on the engine's loop thread between
decoding steps, never beside them, in the order ModelCallQueue gives the waiting calls.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragcache.blending.chunk_kv import ChunkEncoder, ChunkKV
from ragcache.blending.focus import CacheFocus, FocusParameterError
from ragcache.blending.fuser import FusedRequest, FusionReport, fuse
from ragcache.blending.methods import METHOD_NAMES, MethodParam, make_method
from ragcache.blending.prompt import PromptBuilder, PromptLayout
from ragcache.chunkstore.cost_calibration import cost_model_for
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.store import ChunkStore
from ragcache.config import KV_PRECOMPUTE_MODES, Config
from ragcache.corpus.ingest import (
    FileSource,
    Ingestor,
    IngestResult,
    Progress,
    no_progress,
    parse_documents,
    read_sources,
)
from ragcache.corpus.jobs import Job, JobRunner
from ragcache.corpus.manifest import Manifest, open_manifest
from ragcache.corpus.store import ChunkRecord, CorpusInfo, CorpusStore, DocumentRecord
from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel, load_model
from ragcache.engine.lora import LoraLoadError, UnknownAdapterError
from ragcache.engine.lora_manager import AdapterInfo
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams
from ragcache.errors import (
    ConflictError,
    InvalidInputError,
    InvalidParameterError,
    NotFoundError,
    PromptTooLongError,
    ServiceError,
)
from ragcache.retriever.chunker import Chunker
from ragcache.retriever.embedder import Embedder, SentenceTransformerEmbedder
from ragcache.retriever.retriever import Retriever
from ragcache.service.chunk_cache import ChunkCache
from ragcache.service.chunk_gather import GatheredKV, gather_overlapped, gather_sequential
from ragcache.service.model_calls import ModelCallQueue, QueryCost
from ragcache.service.results import CacheUsage, QueryResult, SourceChunk

_PARAM_IN_MESSAGE = re.compile(r"sampling parameter (\w+)=")
# Stored names of a tenant's corpora start with a digest of the tenant id, so they stay
# valid corpus names whatever the tenant id is; the default tenant may not use the form.
_TENANT_CORPUS_PREFIX = re.compile(r"^t[0-9a-f]{8}--")
# Request fields of CacheFocus (same names in the fusion config) -> method parameters.
_FOCUS_FIELDS = {
    "focus_keep": "keep",
    "focus_layers": "layers",
    "focus_order": "order",
    "focus_base": "base",
}


def tenant_corpus_prefix(tenant: str) -> str:
    if not tenant:
        return ""
    return "t" + hashlib.blake2b(tenant.encode(), digest_size=4).hexdigest() + "--"


@dataclass(slots=True)
class PreparedQuery:
    prompt_ids: list[int]
    fused: FusedRequest
    sources: list[SourceChunk]
    usage: CacheUsage
    sampling: SamplingParams
    timings: dict[str, float | None]
    received: float = 0.0
    cached_spans: list[tuple[int, int]] = field(default_factory=list)
    length_param: str = "k"

    def cached_tokens(self, engine_cached: int) -> int:
        """Prompt tokens whose KV came from a cache: the engine's prefix cache, then the
        chunk-cache hits that lie after it (never counted twice)."""
        after = sum(max(0, end - max(start, engine_cached)) for start, end in self.cached_spans)
        return engine_cached + after


@dataclass(slots=True, frozen=True)
class GenerationRecord:
    """One finished generation, as handed to ``RagCache.observers``."""

    tenant: str
    queue_s: float  # arrival at the service -> submission to the engine
    ttft_s: float | None
    e2e_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    recompute_fraction: float | None  # None for prompts without chunks


@dataclass(slots=True)
class IngestTotals:
    documents: int = 0
    chunks: int = 0
    jobs_running: int = 0


class TenantJobs:
    """The ingest jobs of one tenant's corpora, shown under their public names."""

    def __init__(self, runner: JobRunner, prefix: str) -> None:
        self.runner = runner
        self.prefix = prefix

    def submit(self, kind: str, corpus: str, work: Callable[[Progress], dict[str, Any]]) -> Job:
        return self.runner.submit(kind, corpus, work)

    def get(self, job_id: str) -> Job:
        job = self.runner.get(job_id)
        owned = (
            job.corpus.startswith(self.prefix)
            if self.prefix
            else not _TENANT_CORPUS_PREFIX.match(job.corpus)
        )
        if not owned:
            raise NotFoundError(f"job {job_id!r} does not exist (or is too old to be kept)", "id")
        return dataclasses.replace(job, corpus=job.corpus[len(self.prefix) :])


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
            try:
                engine = Engine(
                    loaded or load_model(self.config.model), self.config.engine, self.config.lora
                )
            except LoraLoadError as error:
                raise InvalidParameterError(str(error), "lora.adapters") from None
        self.engine = engine
        self.loaded = engine.loaded
        if self.loaded.tokenizer is None:
            raise InvalidParameterError("the model has no tokenizer; RAG needs one", "model.path")
        taken = self._model_names() & set(engine.lora.infos)
        if taken:
            raise InvalidParameterError(
                f"adapter name {sorted(taken)[0]!r} is the name of a served model; rename it",
                "lora.adapters",
            )
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
        cost_model = cost_model_for(
            self.config.chunkstore.cost_model, self.loaded, self.data_dir / "calibration"
        )
        store = ChunkStore(self.config.chunkstore, self.data_dir / "chunks", cost_model)
        self.chunk_cache = ChunkCache(store, context, self.prompts.root_ids)
        self.async_engine = AsyncEngine(self.engine)
        # Threads that wait on the engine thread's chunk encoding while a query reads its
        # cached chunks (service.overlap_kv); shared by tenant and adapter views.
        self._kv_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ragcache-kv")
        engine_config = self.engine.config
        self.model_calls = ModelCallQueue(
            self.async_engine,
            engine_config.scheduling_policy == "cache_aware",
            engine_config.starvation_s,
        )
        self.adapter: AdapterInfo | None = None
        self.encoder: ChunkEncoder = self.async_engine.run_sync(self._new_encoder)
        precompute = self._precompute_kv if service.kv_precompute == "eager" else None
        self.ingestor = Ingestor(
            self.corpora, self.chunker, self.embedder, precompute, self.prompts.separator_ids
        )
        self.jobs: JobRunner | TenantJobs = JobRunner(service.job_history)
        self.tenant = ""
        self.observers: list[Callable[[GenerationRecord], None]] = []
        self.ingest_totals = IngestTotals()
        self._views: dict[str, RagCache] = {}
        self._adapter_views: dict[tuple[str, str], RagCache] = {}
        self._views_lock = threading.Lock()

    def for_tenant(self, tenant: str) -> RagCache:
        """This service as one tenant sees it: its own corpora, jobs, chunk-cache keys and
        engine prefix-cache salt. Views share every component; close only the parent."""
        if tenant == self.tenant and self.adapter is None:
            return self
        if self.tenant or self.adapter is not None:
            raise RuntimeError("for_tenant is called on the parent service, not on a view")
        with self._views_lock:
            view = self._views.get(tenant)
            if view is None:
                view = copy.copy(self)
                view.tenant = tenant
                context = dataclasses.replace(self.chunk_cache.tree.context, tenant=tenant)
                view.chunk_cache = ChunkCache(
                    self.chunk_cache.store, context, self.prompts.root_ids
                )
                precompute = (
                    view._precompute_kv if self.config.service.kv_precompute == "eager" else None
                )
                view.ingestor = Ingestor(
                    self.corpora,
                    self.chunker,
                    self.embedder,
                    precompute,
                    self.prompts.separator_ids,
                )
                assert isinstance(self.jobs, JobRunner)
                view.jobs = TenantJobs(self.jobs, tenant_corpus_prefix(tenant))
                self._views[tenant] = view
        return view

    def close(self) -> None:
        assert isinstance(self.jobs, JobRunner), "close the parent service, not a tenant view"
        self.jobs.shutdown()
        self._kv_pool.shutdown(wait=True)
        self.model_calls.close()
        self.async_engine.shutdown()
        for view in [*self._views.values(), *self._adapter_views.values()]:
            view.chunk_cache.tree.close()
        self.chunk_cache.close()
        self.corpora.close()

    # ---- LoRA adapters ----------------------------------------------------------------

    def _model_names(self) -> set[str]:
        return {self.loaded.name, self.config.retriever.embedder}

    def list_adapters(self) -> list[AdapterInfo]:
        # One C-level copy of the engine's registry (atomic under the GIL); infos are frozen.
        infos = list(self.engine.lora.infos.values())
        return sorted(infos, key=lambda info: info.name)

    def adapter_info(self, name: str) -> AdapterInfo:
        info = self.engine.lora.infos.get(name)
        if info is None:
            known = ", ".join(a.name for a in self.list_adapters()) or "none"
            raise NotFoundError(f"adapter {name!r} is not loaded (adapters: {known})", "model")
        return info

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load a PEFT LoRA adapter folder: read and checked on this thread, registered
        between engine steps."""
        if name in self._model_names() or name in self.engine.lora.infos:
            raise ConflictError(f"the name {name!r} is already served; pick another", "lora_name")
        try:
            adapter = self.engine.lora.read(path, name)
            return self.async_engine.run_sync(lambda e: e.lora.add(adapter))
        except LoraLoadError as error:
            raise InvalidInputError(str(error), "lora_path") from None

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Unload an adapter once no request uses it; its stored chunk caches stay on disk
        and serve it again if the same weights are loaded later."""
        try:
            info = self.async_engine.run_sync(lambda e: e.remove_lora(name))
        except UnknownAdapterError as error:
            raise NotFoundError(str(error), "lora_name") from None
        except InvalidRequestError as error:
            raise ConflictError(str(error), "lora_name") from None
        with self._views_lock:
            for key in [k for k in self._adapter_views if k[1] == info.id]:
                self._adapter_views.pop(key).chunk_cache.tree.close()
        return info

    def for_adapter(self, name: str | None) -> RagCache:
        """This service (or tenant view) answering under LoRA adapter ``name``: chunk KV
        computed and cached under that adapter, and its own engine prefix-cache salt.
        None is the base model."""
        if self.adapter is not None:
            if name == self.adapter.name:
                return self
            raise RuntimeError("for_adapter is called on the service or a tenant view")
        if name is None:
            return self
        info = self.adapter_info(name)
        with self._views_lock:
            view = self._adapter_views.get((self.tenant, info.id))
            if view is None:
                view = copy.copy(self)
                view.adapter = info
                context = dataclasses.replace(self.chunk_cache.tree.context, adapter_id=info.id)
                view.chunk_cache = ChunkCache(
                    self.chunk_cache.store, context, self.prompts.root_ids
                )
                view.encoder = self.async_engine.run_sync(view._new_encoder)
                self._adapter_views[(self.tenant, info.id)] = view
        return view

    @property
    def _adapter_id(self) -> str | None:
        """What the engine is told: name and content, so weights loaded later under the
        same name never meet KV made under these."""
        return None if self.adapter is None else self.adapter.id

    @contextmanager
    def _adapter_scope(self, engine: Engine) -> Iterator[None]:
        """Model calls inside run under this view's adapter (on the engine's thread)."""
        if self._adapter_id is not None:
            try:
                engine.lora.get(self._adapter_id)
            except UnknownAdapterError as error:
                raise NotFoundError(str(error), "model") from None
            except LoraLoadError as error:
                raise ConflictError(str(error), "model") from None
        with engine.lora.uniform(self._adapter_id):
            yield

    def _new_encoder(self, engine: Engine) -> ChunkEncoder:
        with self._adapter_scope(engine):
            return ChunkEncoder(engine.model, self.prompts.root_ids, engine.config.block_size)

    def __enter__(self) -> RagCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- corpora and documents -------------------------------------------------------

    def _owns(self, stored_name: str) -> bool:
        prefix = tenant_corpus_prefix(self.tenant)
        if prefix:
            return stored_name.startswith(prefix)
        return not _TENANT_CORPUS_PREFIX.match(stored_name)

    def _public(self, info: CorpusInfo) -> CorpusInfo:
        prefix = tenant_corpus_prefix(self.tenant)
        return dataclasses.replace(info, name=info.name[len(prefix) :])

    def _stored_name(self, name: str, *, must_exist: bool = True) -> str:
        """The stored name of this tenant's corpus ``name``; unknown names raise 404
        without naming other tenants' corpora."""
        prefix = tenant_corpus_prefix(self.tenant)
        if not isinstance(name, str) or not name or _TENANT_CORPUS_PREFIX.match(name):
            raise InvalidParameterError(f"corpus name {name!r} is invalid", "corpus")
        stored = prefix + name
        if must_exist and stored not in {c.name for c in self.corpora.list()}:
            known = ", ".join(c.name for c in self.list_corpora()) or "none yet"
            raise NotFoundError(f"corpus {name!r} does not exist (corpora: {known})", "corpus")
        return stored

    def create_corpus(self, name: str, description: str = "") -> CorpusInfo:
        prefix = tenant_corpus_prefix(self.tenant)
        if isinstance(name, str) and _TENANT_CORPUS_PREFIX.match(name):
            raise InvalidParameterError(
                f"corpus name {name!r} is invalid: names of the form t<8 hex digits>-- "
                "are reserved for tenant namespaces",
                "name",
            )
        if prefix and isinstance(name, str) and len(name) > 64 - len(prefix):
            raise InvalidParameterError(
                f"corpus name {name!r} is too long; use at most {64 - len(prefix)} characters",
                "name",
            )
        stored = self._stored_name(name, must_exist=False)
        if stored in {c.name for c in self.corpora.list()}:
            raise ConflictError(f"corpus {name!r} already exists", "name")
        return self._public(self.corpora.create(stored, description))

    def list_corpora(self) -> list[CorpusInfo]:
        return [self._public(c) for c in self.corpora.list() if self._owns(c.name)]

    def get_corpus(self, name: str) -> CorpusInfo:
        return self._public(self.corpora.get(self._stored_name(name)))

    def delete_corpus(self, name: str) -> None:
        self.corpora.delete(self._stored_name(name))

    def list_documents(self, corpus: str) -> list[DocumentRecord]:
        return self.corpora.documents(self._stored_name(corpus))

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
        if create and corpus not in {c.name for c in self.list_corpora()}:
            self.create_corpus(corpus)
        result = self.ingestor.ingest(self._stored_name(corpus), documents, progress)
        self._count_ingested(result)
        result.corpus = corpus
        return result

    def _count_ingested(self, result: IngestResult) -> None:
        totals = self.ingest_totals
        totals.documents += len(result.added) + len(result.replaced)
        totals.chunks += result.chunks_added

    def submit_ingest(self, sources: Sequence[FileSource], corpus: str) -> Job:
        """Validates the files now and ingests them in the background; returns the job."""
        stored = self._stored_name(corpus)
        documents = parse_documents(read_sources(sources))

        def work(progress: Progress) -> dict[str, Any]:
            self.ingest_totals.jobs_running += 1
            try:
                result = self.ingestor.ingest(stored, documents, progress)
            finally:
                self.ingest_totals.jobs_running -= 1
            self._count_ingested(result)
            return {
                "added": result.added,
                "replaced": result.replaced,
                "skipped": result.skipped,
                "chunks_added": result.chunks_added,
                "kv_chunks_computed": result.kv_chunks_computed,
                "seconds": result.seconds,
            }

        return self.jobs.submit("ingest", stored, work)

    def delete_document(self, corpus: str, doc_id: str) -> None:
        stored = self._stored_name(corpus)
        with self.corpora.write_lock:
            change = self.corpora.begin_change(stored)
            record = self.corpora.document(stored, doc_id)
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
        return self._retrieve(text, self._stored_name(corpus), self._check_k(k))[0]

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embedding vectors of ``texts`` from the retriever's embedder, and the number of
        tokens they hold (counted with the served model's tokenizer)."""
        vectors = self.embedder.embed(list(texts))
        tokens = sum(len(self.prompts.encode(text)) for text in texts)
        return vectors.tolist(), tokens

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
        method_params: dict[str, MethodParam] | None = None,
        sampling: SamplingParams | None = None,
    ) -> AsyncIterator[str | QueryResult]:
        """Answer text pieces as they decode, then the QueryResult."""
        prepared = await asyncio.to_thread(
            self.prepare_corpus, text, corpus, k, method, method_params or {}, sampling
        )
        last: RequestOutput | None = None
        async for out in self.generate(prepared):
            last = out
            if out.new_text:
                yield out.new_text
        assert last is not None
        yield QueryResult(
            last.text,
            last.finish_reason,
            prepared.sources,
            prepared.usage,
            prepared.timings,
            len(prepared.fused.prompt_ids),
            len(last.token_ids),
        )

    async def generate(
        self, prepared: PreparedQuery, sampling: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of a prepared prompt as they decode (``sampling`` overrides the
        prepared one, e.g. another seed per choice). Fills the prepared usage and timings
        and tells the observers once it finishes."""
        fused = prepared.fused
        submitted = time.perf_counter()
        first: float | None = None
        last: RequestOutput | None = None
        try:
            async for out in self.async_engine.stream(
                fused.prompt_ids,
                sampling or prepared.sampling,
                placed=fused.placed,
                cache_salt=self.tenant,
                use_prefix_cache=fused.use_prefix_cache,
                adapter=self._adapter_id,
            ):
                if out.finish_reason == "error":
                    raise PromptTooLongError(
                        out.error or "the engine refused the prompt", prepared.length_param
                    )
                if first is None and out.token_ids:
                    first = time.perf_counter()
                last = out
                yield out
        except InvalidRequestError as error:
            raise InvalidInputError(str(error)) from None
        finished = time.perf_counter()
        assert last is not None
        prepared.usage.engine_cached_tokens = last.num_cached_tokens
        timings = prepared.timings
        timings["prefill"] = None if first is None else first - submitted
        timings["decode"] = None if first is None else finished - first
        timings["ttft"] = None if first is None else first - prepared.received
        timings["total"] = finished - prepared.received
        report = fused.report
        record = GenerationRecord(
            self.tenant,
            submitted - prepared.received,
            timings["ttft"],
            finished - prepared.received,
            len(fused.prompt_ids),
            len(last.token_ids),
            prepared.cached_tokens(last.num_cached_tokens),
            report.recompute_fraction if report.context_tokens else None,
        )
        for observer in list(self.observers):
            observer(record)

    def _sampling(self, sampling: SamplingParams | None) -> SamplingParams:
        sampling = sampling or SamplingParams(max_tokens=self.config.service.max_tokens)
        try:
            return sampling.validate(self.loaded.spec.vocab_size)
        except InvalidRequestError as error:
            match = _PARAM_IN_MESSAGE.search(str(error))
            param = match.group(1) if match else "stop_token_ids"
            raise InvalidParameterError(str(error), param) from None

    def _method(
        self, name: str | None, params: dict[str, MethodParam]
    ) -> tuple[Any, dict[str, MethodParam]]:
        fusion = self.config.fusion
        name = name or fusion.method
        if name not in METHOD_NAMES:
            raise InvalidParameterError(
                f"fusion method {name!r} is unknown; use one of {', '.join(METHOD_NAMES)}",
                "method",
            )
        known = {"recompute_ratio", "check_layer", "legolink_k", *_FOCUS_FIELDS}
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
        used: dict[str, MethodParam] = {"ratio": ratio, "check_layer": check_layer, "k": legolink_k}
        if name != "cachefocus":
            return make_method(name, **used), used
        for field_name, param in _FOCUS_FIELDS.items():
            used[param] = params.get(field_name, getattr(fusion, field_name))
        try:
            method = make_method(name, **used)
        except FocusParameterError as error:
            raise InvalidParameterError(str(error), f"focus_{error.param}") from None
        assert isinstance(method, CacheFocus)
        if method.layers > layers:
            raise InvalidParameterError(
                f"focus_layers={method.layers} exceeds the model's {layers} layers",
                "focus_layers",
            )
        method.max_prompt_tokens = self.engine.max_model_len - 1
        return method, used

    def prepare_corpus(
        self,
        text: str,
        corpus: str,
        k: int | None,
        method_name: str | None,
        method_params: dict[str, MethodParam],
        sampling: SamplingParams | None,
    ) -> PreparedQuery:
        """A RAG prompt over the ``k`` chunks of ``corpus`` that best match ``text``."""
        received = time.perf_counter()
        sampling = self._sampling(sampling)
        method, params = self._method(method_name, method_params)
        k = self._check_k(k)
        sources, records = self._retrieve(text, self._stored_name(corpus), k)
        chunks = [record.token_ids + self.prompts.separator_ids for record in records]
        hint = f"{len(chunks)} retrieved chunks and the question", "lower k or shorten the question"
        prepared = self._prepare_chunks(chunks, text, sources, method, params, sampling, "k", hint)
        prepared.timings["retrieval"] = prepared.received - received
        prepared.received = received
        return prepared

    def prepare_documents(
        self,
        documents: Sequence[str],
        question: str,
        method_name: str | None = None,
        method_params: dict[str, MethodParam] | None = None,
        sampling: SamplingParams | None = None,
        param: str = "documents",
    ) -> PreparedQuery:
        """A RAG prompt over documents the caller retrieved: each text is one chunk, its
        KV cached by content (under this tenant), then fused before the question."""
        sampling = self._sampling(sampling)
        method, params = self._method(method_name, method_params or {})
        limit = self.config.service.max_k
        if not 1 <= len(documents) <= limit:
            raise InvalidParameterError(
                f"{param} holds {len(documents)} documents; send 1 to {limit}", param
            )
        for number, text in enumerate(documents):
            if not isinstance(text, str) or not text.strip():
                raise InvalidInputError(
                    f"{param}[{number}] is empty; every document must be non-empty text", param
                )
        chunks = [self.prompts.chunk_ids(text) for text in documents]
        sources = [
            SourceChunk(number, f"{param}[{number}]", text, 0.0, 0, len(text), "request")
            for number, text in enumerate(documents)
        ]
        hint = f"{len(chunks)} documents and the question", "send fewer or shorter documents"
        prepared = self._prepare_chunks(
            chunks, question, sources, method, params, sampling, param, hint
        )
        prepared.timings["retrieval"] = 0.0
        return prepared

    def prepare_prompt(
        self, prompt_ids: list[int], sampling: SamplingParams | None = None, param: str = "prompt"
    ) -> PreparedQuery:
        """A plain prompt, without chunks: the engine's prefix cache alone applies."""
        received = time.perf_counter()
        sampling = self._sampling(sampling)
        if not prompt_ids:
            raise InvalidInputError(f"{param} is empty; send at least one token", param)
        limit = self.engine.max_model_len
        if len(prompt_ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; this model and KV pool accept at "
                f"most {limit - 1}: shorten it",
                param,
            )
        report = FusionReport("none", 0, 0, 0, 0.0)
        fused = FusedRequest(list(prompt_ids), None, True, report)
        return PreparedQuery(
            list(prompt_ids), fused, [], CacheUsage("none"), sampling, {}, received, [], param
        )

    def chat_prompt_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of (role, content) messages through the model's chat template, ending
        with the assistant's turn; a plain "Role: content" layout without a template."""
        tokenizer = self.loaded.tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        else:
            turns = [f"{role.capitalize()}: {content}" for role, content in messages]
            text = "\n\n".join([*turns, "Assistant:"])
        return self.prompts.encode(text)

    def _prepare_chunks(
        self,
        chunks: list[list[int]],
        question: str,
        sources: list[SourceChunk],
        method: Any,
        params: dict[str, MethodParam],
        sampling: SamplingParams,
        length_param: str,
        hint: tuple[str, str],
    ) -> PreparedQuery:
        received = time.perf_counter()
        layout = self.prompts.layout(chunks, question)
        limit = self.engine.max_model_len
        shortest, pruned = len(layout), ""
        if isinstance(method, CacheFocus) and chunks:
            # CacheFocus prunes to fit; it needs room for one chunk at least.
            shortest = len(layout.root_ids) + len(layout.query_ids) + min(map(len, chunks))
            pruned = "even pruned to its shortest chunk, "
        if shortest >= limit:
            what, remedy = hint
            raise PromptTooLongError(
                f"{pruned}the prompt has {shortest} tokens ({what}); this model and KV pool "
                f"accept at most {limit - 1}: {remedy}",
                length_param,
            )
        usage = CacheUsage(method.name)
        spans: list[tuple[int, int]] = []
        timings: dict[str, float | None] = {"cache_fetch": 0.0, "kv_compute": 0.0}
        if method.name == "full_prefill":
            context = layout.context_end - len(layout.root_ids)
            report = FusionReport(method.name, context, 0, context, 0.0, params)
            fused = FusedRequest(layout.prompt_ids, None, False, report)
        else:
            cost = self._query_cost(chunks, layout, received)
            gathered = self._gather(chunks, cost)
            cached = gathered.hits
            timings["cache_fetch"] = gathered.fetch_s
            timings["kv_compute"] = gathered.compute_s
            for source, hit, ids in zip(sources, cached, chunks, strict=True):
                if hit is not None:
                    source.cache_tier = hit[1]
                    usage.tokens_by_tier[hit[1]] = usage.tokens_by_tier.get(hit[1], 0) + len(ids)
                else:
                    usage.computed_tokens += len(ids)
            fused = self._fuse(layout, gathered.kvs, method, params, cost)
            if self.config.service.kv_precompute != "off":
                for kv in gathered.computed:
                    self.chunk_cache.put(kv)
            start = len(layout.root_ids)
            for index in fused.report.chunk_order:
                end = start + len(chunks[index])
                if cached[index] is not None:
                    spans.append((start, end))
                start = end
            for index in fused.report.pruned_chunks:
                sources[index].pruned = True
        usage.reused_tokens = fused.report.reused_tokens
        usage.recomputed_tokens = fused.report.recomputed_tokens
        usage.pruned_chunks = len(fused.report.pruned_chunks)
        usage.pruned_tokens = fused.report.pruned_tokens
        timings["fusion"] = fused.report.prepare_s
        return PreparedQuery(
            fused.prompt_ids,
            fused,
            sources,
            usage,
            sampling,
            timings,
            received,
            spans,
            length_param,
        )

    def _query_cost(
        self, chunks: list[list[int]], layout: PromptLayout, received: float
    ) -> QueryCost:
        """Tokens whose KV is cached and tokens to compute: the order of its model calls."""
        cached = 0
        if self.config.service.kv_precompute != "off":
            cached = sum(len(ids) for ids in chunks if self.chunk_cache.contains(ids))
        missing = sum(map(len, chunks)) - cached
        return QueryCost(len(layout.root_ids) + cached, missing + len(layout.query_ids), received)

    def _gather(self, chunks: list[list[int]], cost: QueryCost) -> GatheredKV:
        """Every chunk's KV: cached copies read, missing chunks encoded, at the same time
        when service.overlap_kv is on."""

        def encode(missing: list[list[int]]) -> list[ChunkKV]:
            return self._encode(missing, cost)

        if self.config.service.kv_precompute == "off":
            return gather_sequential(chunks, lambda ids: None, encode)
        if self.config.service.overlap_kv:
            return gather_overlapped(
                chunks, self.chunk_cache.contains, self._fetch_one, encode, self._kv_pool
            )
        return gather_sequential(chunks, self._fetch_one, encode)

    def _fetch_one(self, ids: list[int]) -> tuple[ChunkKV, str] | None:
        cached = self.chunk_cache.fetch(ids)
        return None if cached.kv is None else (cached.kv, cached.tier or "?")

    def _encode(self, chunks: list[list[int]], cost: QueryCost) -> list[ChunkKV]:
        """KV of chunks computed after the root prompt on the engine thread, in calls of at
        most service.kv_batch_tokens tokens so that other queries' calls fit between."""
        budget = self.config.service.kv_batch_tokens
        out: list[ChunkKV] = []
        done = 0
        while done < len(chunks):
            batch, tokens = [], 0
            for ids in chunks[done:]:
                if batch and tokens + len(ids) > budget:
                    break
                batch.append(ids)
                tokens += len(ids)

            def encode(engine: Engine, batch: list[list[int]] = batch) -> list[ChunkKV]:
                with self._adapter_scope(engine):
                    return self.encoder.encode(batch)

            out.extend(self.model_calls.run(encode, cost))
            done += len(batch)
        return out

    def _fuse(
        self,
        layout: PromptLayout,
        kvs: list[ChunkKV],
        method: Any,
        params: dict[str, MethodParam],
        cost: QueryCost,
    ) -> FusedRequest:
        def place_and_repair(engine: Engine) -> FusedRequest:
            with self._adapter_scope(engine):
                return fuse(engine.model, layout, self.encoder.root, kvs, method, params)

        return self.model_calls.run(place_and_repair, cost)

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
