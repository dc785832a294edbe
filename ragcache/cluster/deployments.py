"""Ray Serve deployments: retrieval (embedder and faiss, cheap), generation (a RagCache with
the engine, the expensive part, N replicas behind the cache-aware router) and a frontend
that chains them. Replica health, restarts and autoscaling are Ray Serve's.

Every generator replica keeps its own data directory (``data_root/replica-<id>``: host
tier, LMDB, calibration) and shares the Redis tier named by ``chunkstore.remote_url``, so a
chunk one replica encodes is read by the others instead of computed again. Generation
requests carry their documents' texts: each replica tokenizes a text alone, so every
replica derives the same chunk key for it.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request

from ragcache.cluster.router import CacheAwareRequestRouter
from ragcache.cluster.routing import SeenChunks, chunk_fingerprint
from ragcache.config import Config
from ragcache.corpus.store import CorpusStore
from ragcache.engine.sampling_params import SamplingParams
from ragcache.retriever.config import RetrieverConfig
from ragcache.retriever.embedder import SentenceTransformerEmbedder
from ragcache.retriever.retriever import Retriever
from ragcache.service.rag_cache import RagCache
from ragcache.service.tenancy import tenant_corpus_prefix

MEMORY_TIERS = ("device", "host")
# A generation lost with its replica (SIGKILL, node loss) is sent again: it is idempotent.
# Ray drops the dead replica from the candidates once it notices; the pause lets it.
GENERATION_ATTEMPTS = 4
RETRY_PAUSE_S = 0.5


@dataclass(slots=True)
class ClusterSpec:
    """How to build the application. ``config`` is every generator's service config (its
    ``chunkstore.remote_url`` names the shared Redis); ``corpus_dir`` is a data directory
    whose corpora the retrieval deployment serves (None: documents-only requests)."""

    config: Config
    data_root: str
    corpus_dir: str | None = None
    generators: int = 2
    queue_weight: float = 1.0
    stats_period_s: float = 0.5
    generator_cpus: float = 1.0
    max_ongoing_requests: int = 8


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Retrieval:
    """Top-k chunk texts of a corpus, read from a corpus store every replica reaches."""

    def __init__(self, corpus_dir: str, config: RetrieverConfig) -> None:
        self.config = config
        self.embedder = SentenceTransformerEmbedder.from_config(config)
        self.store = CorpusStore(Path(corpus_dir), self.embedder.dim, config)

    def retrieve(self, question: str, corpus: str, k: int, tenant: str = "") -> list[dict]:
        stored = tenant_corpus_prefix(tenant) + corpus
        known = {info.name for info in self.store.list()}
        if stored not in known:
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
    """A RagCache answering requests over given documents; reports the chunks its memory
    tiers hold, for the router."""

    def __init__(self, config: Config, data_root: str) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        config = copy.deepcopy(config)
        config.data_dir = str(Path(data_root) / f"replica-{self.replica_id}")
        self.rag = RagCache(config=config)
        self.seen = SeenChunks()
        self.ongoing = 0

    def _remember(self, view: RagCache, documents: list[str], tenant: str) -> None:
        for text in documents:
            key = view.chunk_cache.key(view.prompts.chunk_ids(text))
            self.seen.add(chunk_fingerprint(text, tenant), key)

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer ``request["question"]`` over ``request["documents"]``; says which tier
        each chunk's KV came from (None: computed here)."""
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
            self._remember(view, documents, tenant)
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


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Frontend:
    """Retrieval, then generation on the replica the router picks."""

    def __init__(self, generation: DeploymentHandle, retrieval: DeploymentHandle | None) -> None:
        self.generation = generation
        self.retrieval = retrieval

    async def query(
        self,
        question: str,
        corpus: str,
        k: int = 3,
        tenant: str = "",
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        if self.retrieval is None:
            raise ValueError("this cluster has no corpus store; send documents to answer()")
        chunks = await self.retrieval.retrieve.remote(question, corpus, k, tenant)
        result = await self.answer(
            [chunk["text"] for chunk in chunks], question, tenant, max_tokens
        )
        return {**result, "sources": chunks}

    async def answer(
        self,
        documents: list[str],
        question: str,
        tenant: str = "",
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        request = {
            "documents": documents,
            "question": question,
            "tenant": tenant,
            "max_tokens": max_tokens,
            "chunk_fingerprints": [chunk_fingerprint(text, tenant) for text in documents],
        }
        attempt = 1
        while True:
            try:
                return await self.generation.generate.remote(request)
            except (RayActorError, ActorUnavailableError):
                if attempt == GENERATION_ATTEMPTS:
                    raise
                await asyncio.sleep(RETRY_PAUSE_S * attempt)
                attempt += 1

    async def cache_stats(self) -> dict[str, Any]:
        return await self.generation.cache_stats.remote()

    async def __call__(self, http: Request) -> dict[str, Any]:
        """POST JSON ``{"question", "corpus", "k"}`` or ``{"question", "documents"}``, with
        an optional ``max_tokens``; the default tenant (this route has no auth)."""
        body = await http.json()
        if not isinstance(body, dict) or not isinstance(body.get("question"), str):
            raise ValueError('send a JSON object with "question" and "corpus" or "documents"')
        max_tokens = body.get("max_tokens")
        if "documents" in body:
            return await self.answer(list(body["documents"]), body["question"], "", max_tokens)
        k = int(body.get("k", 3))
        return await self.query(body["question"], str(body["corpus"]), k, "", max_tokens)


def build_app(spec: ClusterSpec) -> serve.Application:
    """The application: Frontend -> Retrieval (when ``corpus_dir``) and Generation."""
    router = RequestRouterConfig(
        request_router_class=CacheAwareRequestRouter,
        request_router_kwargs={"queue_weight": spec.queue_weight},
        request_routing_stats_period_s=spec.stats_period_s,
        request_routing_stats_timeout_s=max(spec.stats_period_s, 5.0),
    )
    generation = Generation.options(
        num_replicas=spec.generators,
        max_ongoing_requests=spec.max_ongoing_requests,
        ray_actor_options={"num_cpus": spec.generator_cpus},
        request_router_config=router,
    ).bind(spec.config, spec.data_root)
    retrieval = None
    if spec.corpus_dir is not None:
        retrieval = Retrieval.bind(spec.corpus_dir, spec.config.retriever)
    return Frontend.bind(generation, retrieval)
