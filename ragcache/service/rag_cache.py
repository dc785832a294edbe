"""RagCache: the query pipeline as plain calls, usable without HTTP.

retrieve -> chunk KV from the store (missing chunks computed, and stored unless
service.kv_precompute is off; with service.overlap_kv the reads and the encoding run at
the same time) -> fuse -> engine. Model compute runs on the engine's loop thread between
decoding steps, never beside them, in the order ModelCallQueue gives the waiting calls.

The work is done by one collaborator per responsibility (corpora.py, prepare.py,
kv_source.py, generation.py, adapters.py); this class builds them and is the face.
A tenant or adapter view is a copy whose per-view collaborators are bound anew.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ragcache.blending.chunk_kv import ChunkEncoder
from ragcache.blending.methods import MethodParam
from ragcache.blending.prompt import PromptBuilder
from ragcache.chunkstore.cost_calibration import cost_model_for
from ragcache.chunkstore.keys import KeyContext
from ragcache.chunkstore.store import ChunkStore
from ragcache.config import Config
from ragcache.corpus.ingest import FileSource, Ingestor, IngestResult
from ragcache.corpus.jobs import Job, JobRunner
from ragcache.corpus.progress import Progress, no_progress
from ragcache.corpus.store import CorpusInfo, CorpusStore, DocumentRecord
from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.lora_manager import AdapterInfo
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sampling_params import SamplingParams
from ragcache.retriever.chunker import Chunker
from ragcache.retriever.embedder import Embedder, SentenceTransformerEmbedder
from ragcache.service.adapters import Adapters, adapter_scope
from ragcache.service.chunk_cache import ChunkCache
from ragcache.service.chunk_gc import ChunkCollector, CollectReport, TenantJournal
from ragcache.service.corpora import IngestTotals, TenantCorpora
from ragcache.service.generation import Generator, Observer
from ragcache.service.kv_source import ChunkKVSource
from ragcache.service.model_calls import ModelCallQueue
from ragcache.service.prepare import QueryPreparer
from ragcache.service.results import PreparedQuery, QueryResult, SourceChunk
from ragcache.service.setup import (
    check_service_config,
    open_data_dir,
    open_engine,
    served_model_names,
)
from ragcache.service.tenancy import TenantJobs
from ragcache.service.views import Views


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
        check_service_config(self.config)
        self.engine = open_engine(self.config, loaded, engine)
        self.loaded = self.engine.loaded
        self.embedder = embedder or SentenceTransformerEmbedder.from_config(self.config.retriever)
        self.data_dir = open_data_dir(self.config, self.loaded, self.embedder)
        self.prompts = PromptBuilder(self.loaded.tokenizer, service.system_prompt)
        self.chunker = Chunker.from_config(self.loaded.tokenizer, self.config.retriever)
        self.corpora = CorpusStore(
            self.data_dir, self.embedder.dim, self.config.retriever, self.embedder.embed
        )
        cost_model = cost_model_for(
            self.config.chunkstore.cost_model, self.loaded, self.data_dir / "calibration"
        )
        self.store = ChunkStore(self.config.chunkstore, self.data_dir / "chunks", cost_model)
        self.collector = ChunkCollector(self.corpora, self.store, self.prompts.separator_ids)
        self.startup_collection = self.collector.collect()
        self.async_engine = AsyncEngine(self.engine)
        # Threads that wait on the engine thread's chunk encoding while a query reads its
        # cached chunks (service.overlap_kv); shared by tenant and adapter views.
        self.kv_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ragcache-kv")
        engine_config = self.engine.config
        self.model_calls = ModelCallQueue(
            self.async_engine,
            engine_config.scheduling_policy == "cache_aware",
            engine_config.starvation_s,
        )
        self.adapters = Adapters(self.async_engine, served_model_names(self.config, self.loaded))
        self.job_runner = JobRunner(service.job_history)
        self.observers: list[Observer] = []
        self.ingest_totals = IngestTotals()
        self._views: Views[RagCache] = Views(lambda view: view.chunk_cache.tree.close())
        context = KeyContext(
            self.loaded.fingerprint, str(self.loaded.dtype), self.config.chunkstore.disk_codec
        )
        self._bind("", None, ChunkCache(self.store, context, self.prompts.root_ids))
        self._bind_ingest()

    def _bind(self, tenant: str, adapter: AdapterInfo | None, chunk_cache: ChunkCache) -> None:
        """This view's collaborators: its chunk-cache keys, encoder, preparation and
        generation under ``tenant`` and ``adapter``."""
        self.tenant = tenant
        self.adapter = adapter
        self.chunk_cache = chunk_cache
        adapter_id = None if adapter is None else adapter.id
        if adapter is not None or not hasattr(self, "encoder"):

            def new_encoder(engine: Engine) -> ChunkEncoder:
                with adapter_scope(engine, adapter_id):
                    return ChunkEncoder(
                        engine.model, self.prompts.root_ids, engine.config.block_size
                    )

            self.encoder = self.async_engine.run_sync(new_encoder)
        self.kv = ChunkKVSource(
            chunk_cache,
            self.encoder,
            adapter_id,
            self.async_engine,
            self.model_calls,
            self.kv_pool,
            self.config.service,
        )
        self.generator = Generator(self.async_engine, tenant, adapter_id, self.observers)

    def _bind_ingest(self) -> None:
        """This tenant's corpora, ingestion (its KV computed under the base model) and jobs."""
        eager = self.config.service.kv_precompute == "eager"
        journal = TenantJournal(self.collector, self.tenant)
        self.ingestor = Ingestor(
            self.corpora,
            self.chunker,
            self.embedder,
            self.kv.precompute if eager else None,
            self.prompts.separator_ids,
            journal,
        )
        self.jobs: JobRunner | TenantJobs = (
            TenantJobs(self.job_runner, self.tenant) if self.tenant else self.job_runner
        )
        self.tenant_corpora = TenantCorpora(
            self.corpora,
            self.tenant,
            self.ingestor,
            self.jobs,
            self.embedder,
            self.config,
            self.ingest_totals,
            journal,
        )
        self._bind_preparer()

    def _bind_preparer(self) -> None:
        self.preparer = QueryPreparer(
            self.config, self.engine, self.prompts, self.tenant_corpora, self.kv
        )

    def _view(self, tenant: str, adapter: AdapterInfo | None) -> RagCache:
        def make() -> RagCache:
            view = copy.copy(self)
            changes: dict[str, Any] = {"tenant": tenant}
            if adapter is not None:
                changes["adapter_id"] = adapter.id
            context = dataclasses.replace(self.chunk_cache.tree.context, **changes)
            view._bind(tenant, adapter, ChunkCache(self.store, context, self.prompts.root_ids))
            if adapter is None:
                view._bind_ingest()
            else:
                view._bind_preparer()
            return view

        return self._views.get((tenant, None if adapter is None else adapter.id), make)

    def for_tenant(self, tenant: str) -> RagCache:
        """This service as one tenant sees it: its own corpora, jobs, chunk-cache keys and
        engine prefix-cache salt. Views share every component; close only the parent."""
        if tenant == self.tenant and self.adapter is None:
            return self
        if self.tenant or self.adapter is not None:
            raise RuntimeError("for_tenant is called on the parent service, not on a view")
        return self._view(tenant, None)

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
        return self._view(self.tenant, self.adapters.info(name))

    def close(self) -> None:
        assert not self.tenant and self.adapter is None, "close the parent service, not a view"
        self.job_runner.shutdown()
        self.kv_pool.shutdown(wait=True)
        self.model_calls.close()
        self.async_engine.shutdown()
        self._views.release_all()
        self.chunk_cache.close()
        self.corpora.close()

    def __enter__(self) -> RagCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- LoRA adapters: the engine's registry (see adapters.py) ------------------------

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    def adapter_info(self, name: str) -> AdapterInfo:
        return self.adapters.info(name)

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        return self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Unload an adapter once no request uses it; its stored chunk caches stay on disk
        and serve it again if the same weights are loaded later."""
        info = self.adapters.unload(name)
        self._views.drop_adapter(info.id)
        return info

    # ---- corpora and documents -------------------------------------------------------

    def create_corpus(self, name: str, description: str = "") -> CorpusInfo:
        return self.tenant_corpora.create(name, description)

    def list_corpora(self) -> list[CorpusInfo]:
        return self.tenant_corpora.list()

    def get_corpus(self, name: str) -> CorpusInfo:
        return self.tenant_corpora.get(name)

    def delete_corpus(self, name: str) -> None:
        self.tenant_corpora.delete(name)

    def list_documents(self, corpus: str) -> list[DocumentRecord]:
        return self.tenant_corpora.documents(corpus)

    def ingest(
        self,
        sources: Sequence[FileSource],
        corpus: str,
        *,
        create: bool = False,
        progress: Progress = no_progress,
    ) -> IngestResult:
        """Adds files (paths, folders or (bytes, filename) pairs) to a corpus."""
        return self.tenant_corpora.ingest(sources, corpus, create=create, progress=progress)

    def submit_ingest(self, sources: Sequence[FileSource], corpus: str) -> Job:
        """Validates the files now and ingests them in the background; returns the job."""
        return self.tenant_corpora.submit_ingest(sources, corpus)

    def delete_document(self, corpus: str, doc_id: str) -> None:
        self.tenant_corpora.delete_document(corpus, doc_id)

    # ---- retrieval and queries ---------------------------------------------------------

    def retrieve(self, text: str, corpus: str, k: int | None = None) -> list[SourceChunk]:
        return self.tenant_corpora.retrieve(text, corpus, k)[0]

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embedding vectors of ``texts`` from the retriever's embedder, and the number of
        tokens they hold (counted with the served model's tokenizer)."""
        vectors = self.embedder.embed(list(texts))
        tokens = sum(len(self.prompts.encode(text)) for text in texts)
        return vectors.tolist(), tokens

    def prepare_corpus(
        self,
        text: str,
        corpus: str,
        k: int | None,
        method_name: str | None,
        method_params: dict[str, MethodParam],
        sampling: SamplingParams | None,
        conversation: Sequence[tuple[str, str]] = (),
    ) -> PreparedQuery:
        """A RAG prompt over the ``k`` chunks of ``corpus`` that best match ``text``, after
        the (role, content) turns of ``conversation`` when given."""
        return self.preparer.prepare_corpus(
            text, corpus, k, method_name, method_params, sampling, conversation
        )

    def prepare_documents(
        self,
        documents: Sequence[str],
        question: str,
        method_name: str | None = None,
        method_params: dict[str, MethodParam] | None = None,
        sampling: SamplingParams | None = None,
        param: str = "documents",
        conversation: Sequence[tuple[str, str]] = (),
    ) -> PreparedQuery:
        """A RAG prompt over documents the caller retrieved (each text one chunk), after
        the (role, content) turns of ``conversation`` when given."""
        return self.preparer.prepare_documents(
            documents, question, method_name, method_params, sampling, param, conversation
        )

    def prepare_prompt(
        self, prompt_ids: list[int], sampling: SamplingParams | None = None, param: str = "prompt"
    ) -> PreparedQuery:
        """A plain prompt, without chunks: the engine's prefix cache alone applies."""
        return self.preparer.prepare_prompt(prompt_ids, sampling, param)

    def chat_prompt_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of (role, content) messages through the model's chat template."""
        return self.preparer.chat_prompt_ids(messages)

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

    def generate(
        self, prepared: PreparedQuery, sampling: SamplingParams | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of a prepared prompt as they decode; fills the prepared usage and
        timings and tells the observers once it finishes."""
        return self.generator.generate(prepared, sampling)

    # ---- cache -------------------------------------------------------------------------

    def cache_stats(self) -> dict[str, Any]:
        engine = self.async_engine.run_sync(lambda e: e.stats())
        return {
            "chunks": self.chunk_cache.stats(),
            "engine": engine,
            "corpora": len(self.corpora.list()),
        }

    def cache_gc(self) -> CollectReport:
        """Removes the chunk KV that killed ingests or deletions left behind, entries no
        lookup can reach and unreadable ones; compacts the disk file when it lost any."""
        return self.collector.collect()

    def cache_clear(self) -> dict[str, Any]:
        before = self.chunk_cache.stats()
        self.chunk_cache.clear()
        tiers = before["tiers"]
        assert isinstance(tiers, dict)
        return {"entries_removed": max(t["entries"] for t in tiers.values()) if tiers else 0}
