"""Ray Serve deployments: retrieval (embedder and faiss, cheap), generation (a RagCache with
the engine, the expensive part, N replicas behind the cache-aware router) and the
frontend (frontend.py) that serves the single server's routes through them. Replica
health, restarts and autoscaling are Ray Serve's.

Every generator replica keeps its own data directory (``data_root/replica-<id>``: host
tier, LMDB, its copy of the corpora, calibration) and shares two things in Redis: the
chunk-KV tier named by ``chunkstore.remote_url``, so a chunk one replica encodes is read
by the others instead of computed again, and the corpus log (``corpus_url``), so a
corpus uploaded through any replica is searched by all (shared_corpora.py).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from ragcache.api.app import create_app
from ragcache.cluster.asgi_call import ForwardedRequest, run_asgi
from ragcache.cluster.corpus_log import open_corpus_log
from ragcache.cluster.frontend import REPLICA_HEADER, Frontend
from ragcache.cluster.router import CacheAwareRequestRouter, RoundRobinRequestRouter
from ragcache.cluster.routing import SeenChunks, chunk_fingerprint
from ragcache.cluster.shared_corpora import SharedCorpusStore, share_corpora
from ragcache.config import Config
from ragcache.corpus.store import Embed
from ragcache.engine.sampling_params import SamplingParams
from ragcache.retriever.embedder import SentenceTransformerEmbedder
from ragcache.retriever.retriever import Retriever
from ragcache.service.rag_cache import RagCache
from ragcache.service.tenancy import tenant_corpus_prefix

MEMORY_TIERS = ("device", "host")
ROUTERS = {"cache_aware": CacheAwareRequestRouter, "round_robin": RoundRobinRequestRouter}


@dataclass(slots=True)
class ClusterSpec:
    """How to build the application. ``config`` is every replica's service config (its
    ``chunkstore.remote_url`` names the shared Redis chunk tier); the corpus log lives in
    the Redis at ``corpus_url`` (default: the chunk tier's) under ``corpus_namespace``."""

    config: Config
    data_root: str
    generators: int = 2
    corpus_url: str | None = None
    corpus_namespace: str = "ragcache-corpora"
    corpus_follow_s: float = 1.0
    queue_weight: float = 1.0
    stats_period_s: float = 0.5
    generator_cpus: float = 1.0
    max_ongoing_requests: int = 8
    routing: str = "cache_aware"

    @property
    def corpus_log_url(self) -> str:
        url = self.corpus_url or self.config.chunkstore.remote_url
        if not url:
            raise ValueError("a cluster needs a Redis: set corpus_url or chunkstore.remote_url")
        return url


def open_shared_corpora(
    spec: ClusterSpec, data_dir: Path, dim: int, embed: Embed | None = None
) -> SharedCorpusStore:
    log = open_corpus_log(spec.corpus_log_url, spec.corpus_namespace, dim, spec.corpus_follow_s)
    return SharedCorpusStore(
        data_dir, dim, spec.config.retriever, log, follow_block_s=spec.corpus_follow_s, embed=embed
    )


def replica_data_dir(spec: ClusterSpec, role: str) -> Path:
    replica_id = serve.get_replica_context().replica_id.unique_id
    return Path(spec.data_root) / f"{role}-{replica_id}"


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Retrieval:
    """Top-k chunk texts of a corpus, from this replica's copy of the shared corpora."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.config = spec.config.retriever
        self.embedder = SentenceTransformerEmbedder.from_config(self.config)
        data_dir = replica_data_dir(spec, "retrieval")
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = open_shared_corpora(spec, data_dir, self.embedder.dim, self.embedder.embed)

    def retrieve(self, question: str, corpus: str, k: int, tenant: str = "") -> list[dict]:
        stored = tenant_corpus_prefix(tenant) + corpus
        if stored not in {info.name for info in self.store.list()}:
            raise ValueError(f"corpus {corpus!r} does not exist for this tenant")
        retriever = Retriever(self.embedder, self.store.index(stored), self.config)
        hits = retriever.retrieve(question, k)
        records = self.store.chunks(stored, [hit.chunk_id for hit in hits])
        return [
            {"text": record.text, "doc_id": record.doc_id, "score": hit.score}
            for hit, record in zip(hits, records, strict=True)
            if record is not None
        ]


@serve.deployment
class Generation:
    """A RagCache over the shared corpora, serving the single server's app; reports the
    chunks its memory tiers hold, for the router."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        config = copy.deepcopy(spec.config)
        config.data_dir = str(replica_data_dir(spec, "replica"))
        self.rag = RagCache(config=config)
        log = open_corpus_log(
            spec.corpus_log_url, spec.corpus_namespace, self.rag.embedder.dim, spec.corpus_follow_s
        )
        share_corpora(self.rag, log, spec.corpus_follow_s)
        # The app's log-record factory adds ``request_id`` to every record; Ray Serve
        # passes its own ``request_id`` as an extra, which a record must not have already.
        factory = logging.getLogRecordFactory()
        self.app = create_app(self.rag, config.server)
        logging.setLogRecordFactory(factory)
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._lifespan_lock = asyncio.Lock()
        self.seen = SeenChunks()
        self.ongoing = 0

    def _remember(self, tenant: str, documents: list[str]) -> None:
        view = self.rag.for_tenant(tenant) if tenant else self.rag
        for text in documents:
            key = view.chunk_cache.key(view.prompts.chunk_ids(text))
            self.seen.add(chunk_fingerprint(text, tenant), key)

    async def _started_app(self) -> Any:
        async with self._lifespan_lock:
            if self._lifespan is None:
                self._lifespan = self.app.router.lifespan_context(self.app)
                await self._lifespan.__aenter__()
        return self.app

    async def http(self, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
        """The single server's response to a forwarded HTTP request, streamed."""
        self.ongoing += 1
        try:
            app = await self._started_app()
            async for message in run_asgi(app, request):
                if isinstance(message, dict):
                    header = (REPLICA_HEADER, self.replica_id.encode())
                    message = {**message, "headers": [*message["headers"], header]}
                yield message
            if request.routing_texts:
                self._remember(request.tenant, request.routing_texts)
        finally:
            self.ongoing -= 1

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer ``request["question"]`` over ``request["documents"]`` (a Python handle
        call); says which tier each chunk's KV came from (None: computed here)."""
        self.ongoing += 1
        try:
            tenant = str(request.get("tenant") or "")
            view = self.rag.for_tenant(tenant) if tenant else self.rag
            documents = list(request["documents"])
            max_tokens = request.get("max_tokens")
            sampling = None if max_tokens is None else SamplingParams(max_tokens=int(max_tokens))
            prepared = await asyncio.to_thread(
                view.prepare_documents,
                documents,
                str(request["question"]),
                request.get("method"),
                None,
                sampling,
            )
            self._remember(tenant, documents)
            last = None
            async for out in view.generate(prepared):
                last = out
            assert last is not None
            return {
                "replica": self.replica_id,
                "pid": os.getpid(),
                "answer": last.text,
                "chunk_tiers": [source.cache_tier for source in prepared.sources],
                "usage": dataclasses.asdict(prepared.usage),
                "prompt_tokens": len(prepared.fused.prompt_ids),
                "completion_tokens": len(last.token_ids),
                "torch_threads": torch.get_num_threads(),
            }
        finally:
            self.ongoing -= 1

    def record_routing_stats(self) -> dict[str, Any]:
        memory = [tier for tier in self.rag.store.tiers if tier.name in MEMORY_TIERS]
        held = [
            fingerprint
            for fingerprint, key in self.seen.items()
            if any(tier.contains(key) for tier in memory)
        ]
        return {"memory_chunks": held, "queue_length": self.ongoing}

    def cache_stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, **self.rag.chunk_cache.stats()}

    def __del__(self) -> None:
        rag = getattr(self, "rag", None)
        if rag is not None:
            rag.close()


def build_app(spec: ClusterSpec) -> serve.Application:
    """The application: Frontend -> Retrieval and Generation."""
    if spec.routing not in ROUTERS:
        raise ValueError(f"routing {spec.routing!r}; use one of {', '.join(ROUTERS)}")
    cache_aware = spec.routing == "cache_aware"
    router = RequestRouterConfig(
        request_router_class=ROUTERS[spec.routing],
        request_router_kwargs={"queue_weight": spec.queue_weight} if cache_aware else {},
        request_routing_stats_period_s=spec.stats_period_s,
        request_routing_stats_timeout_s=max(spec.stats_period_s, 5.0),
    )
    generation = Generation.options(
        num_replicas=spec.generators,
        max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={"num_cpus": spec.generator_cpus},
        request_router_config=router,
    ).bind(spec)
    return Frontend.bind(generation, Retrieval.bind(spec), spec.config)
