"""Prometheus /metrics, names under ``ragcache:``, one CollectorRegistry per app.

Request histograms and token counters are fed by the service's generation records;
engine, chunk-store and ingestion state is read when the endpoint is scraped. Every
series carries ``model_name`` as vLLM's do. No ``_created`` series are written (as in
vLLM): they clash with the OpenMetrics parser's names. A scraper that accepts
``application/openmetrics-text`` gets OpenMetrics, others the Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from ragcache.api.media_types import PROMETHEUS_TEXT
from ragcache.service import GenerationRecord, RagCache

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)

prometheus_client.disable_created_metrics()


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to the context length, as vLLM's token histograms."""
    buckets: list[float] = []
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale > max_model_len:
                return tuple(buckets)
            buckets.append(float(step * scale))
        scale *= 10


class _StateCollector(Collector):
    """Gauges and counters read from the service at scrape time."""

    def __init__(self, service: RagCache) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        model = service.loaded.name
        _gauge, _counter = _families(model)
        engine = service.async_engine.run_sync(lambda e: e.stats())
        yield _gauge("num_requests_running", "requests decoding now", engine["num_running"])
        yield _gauge("num_requests_waiting", "requests waiting to start", engine["num_waiting"])
        yield _gauge("kv_cache_usage_perc", "share of KV blocks in use (0-1)", engine["usage"])
        yield _counter(
            "num_preemptions", "sequences preempted to free KV blocks", engine["num_preemptions"]
        )
        queries, hits = engine["prefix_cache_queries"], engine["prefix_cache_hits"]
        yield _counter(
            "prefix_cache_queries", "sequences admitted with a prefix-cache lookup", queries
        )
        yield _counter(
            "prefix_cache_hits", "admitted sequences that reused one cached block or more", hits
        )
        yield _gauge(
            "prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries (0-1)",
            hits / queries if queries else 0.0,
        )  # fmt: skip
        yield _gauge("lora_adapters_loaded", "LoRA adapters served", engine["lora_adapters"])
        yield _gauge(
            "lora_adapters_resident",
            "LoRA adapters in device slots",
            engine["lora_adapters_resident"],
        )
        yield _counter(
            "lora_slot_loads", "LoRA adapters copied into a device slot", engine["lora_slot_loads"]
        )
        yield from _speculation_metrics(engine, model)
        yield from chunk_store_metrics(service.chunk_cache.stats(), model)
        totals = service.ingest_totals
        yield _counter("documents_ingested", "documents added or replaced", totals.documents)
        yield _counter("chunks_ingested", "chunks added by ingestion", totals.chunks)
        yield _gauge("ingest_jobs_running", "ingest jobs running now", totals.jobs_running)


Family = Callable[[str, str, float], Metric]


def _families(model: str) -> tuple[Family, Family]:
    """Makers of one-sample gauge and counter families labelled with ``model``."""

    def gauge(name: str, documentation: str, value: float) -> Metric:
        family = GaugeMetricFamily(f"ragcache:{name}", documentation, labels=["model_name"])
        family.add_metric([model], value)
        return family

    def counter(name: str, documentation: str, value: float) -> Metric:
        family = CounterMetricFamily(f"ragcache:{name}", documentation, labels=["model_name"])
        family.add_metric([model], value)
        return family

    return gauge, counter


def _speculation_metrics(engine: dict[str, float], model: str) -> Iterator[Metric]:
    _gauge, _counter = _families(model)
    yield _counter(
        "spec_decode_num_drafts", "verification steps that carried draft tokens",
        engine["spec_num_drafts"],
    )  # fmt: skip
    yield _counter(
        "spec_decode_num_draft_tokens", "draft tokens verified", engine["spec_num_draft_tokens"]
    )
    yield _counter(
        "spec_decode_num_accepted_tokens", "draft tokens the target kept",
        engine["spec_num_accepted_tokens"],
    )  # fmt: skip
    yield _gauge(
        "spec_decode_acceptance_rate", "share of draft tokens kept (0-1)",
        engine["spec_acceptance_rate"],
    )  # fmt: skip
    yield _gauge(
        "decode_tokens_per_step",
        "tokens a decoding sequence gains per engine step (1 without speculation)",
        engine["decode_tokens_per_step"],
    )


def chunk_store_metrics(stats: dict[str, object], model: str) -> Iterator[Metric]:
    _gauge, _counter = _families(model)
    labels = ["model_name", "tier"]
    hits = CounterMetricFamily(
        "ragcache:chunk_cache_hits", "chunk KV lookups served, by tier", labels=labels
    )
    stored = GaugeMetricFamily(
        "ragcache:chunk_cache_bytes", "bytes of chunk KV held, by tier", labels=labels
    )
    entries = GaugeMetricFamily(
        "ragcache:chunk_cache_entries", "chunk KV entries held, by tier", labels=labels
    )
    tiers = stats["tiers"]
    assert isinstance(tiers, dict)
    total_hits = 0
    errors = CounterMetricFamily(
        "ragcache:chunk_cache_tier_errors",
        "failed calls to a shared tier (Redis), by tier",
        labels=labels,
    )
    reachable = GaugeMetricFamily(
        "ragcache:chunk_cache_tier_reachable",
        "1 while a shared tier answers, by tier",
        labels=labels,
    )
    for tier, values in tiers.items():
        hits.add_metric([model, tier], values["hits"])
        stored.add_metric([model, tier], values["bytes"])
        entries.add_metric([model, tier], values["entries"])
        total_hits += values["hits"]
        if "errors" in values:  # tiers that can fail apart from this process
            errors.add_metric([model, tier], values["errors"])
            reachable.add_metric([model, tier], values["reachable"])
    misses = stats["misses"]
    assert isinstance(misses, int)
    yield hits
    yield _counter("chunk_cache_misses", "chunk KV lookups that found nothing", misses)
    lookups = total_hits + misses
    yield _gauge(
        "chunk_cache_hit_rate", "chunk KV lookups served by any tier / all lookups (0-1)",
        total_hits / lookups if lookups else 0.0,
    )  # fmt: skip
    yield stored
    yield entries
    if errors.samples:
        yield errors
        yield reachable


class ServiceMetrics:
    def __init__(self, service: RagCache) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry
        model = service.loaded.name

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Any:
            family = Histogram(
                f"ragcache:{name}", text, ["model_name"], buckets=buckets, registry=registry
            )
            return family.labels(model)

        def counter(name: str, text: str) -> Any:
            return Counter(f"ragcache:{name}", text, ["model_name"], registry=registry).labels(
                model
            )

        self.ttft = histogram(
            "time_to_first_token_seconds", "arrival to first token", LATENCY_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds", "decode time per token after the first",
            TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to finish", LATENCY_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds",
            "arrival to engine submission (retrieval, chunk KV fetch and fusion wait here)",
            LATENCY_BUCKETS,
        )
        self.recompute = histogram(
            "recompute_fraction", "share of context tokens fusion recomputed", FRACTION_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens of finished requests")
        self.generation_tokens = counter("generation_tokens", "tokens generated")
        self.cached_prompt_tokens = counter(
            "cached_prompt_tokens", "prompt tokens whose KV came from a cache"
        )
        self.requests = counter("requests", "finished generations")
        self.success = Counter(
            "ragcache:request_success",
            "finished generations by finish reason (stop, length, abort, ...)",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self.context_tokens = Counter(
            "ragcache:context_tokens",
            "context tokens of RAG prompts by how their KV was made: exact (an exact tree "
            "path, no repair), reused (placed from a chunk cache unrepaired), recomputed "
            "(repaired by fusion or prefilled)",
            ["model_name", "kind"],
            registry=registry,
        )
        self.model = model
        buckets = token_buckets(service.engine.max_model_len)
        self.prompt_histogram = histogram(
            "request_prompt_tokens", "prompt tokens of a finished request", buckets
        )
        self.generation_histogram = histogram(
            "request_generation_tokens", "tokens generated for a finished request", buckets
        )
        registry.register(_StateCollector(service))

    def observe(self, record: GenerationRecord) -> None:
        self.requests.inc()
        self.success.labels(self.model, record.finish_reason or "unknown").inc()
        self.prompt_histogram.observe(record.prompt_tokens)
        self.generation_histogram.observe(record.completion_tokens)
        usage = record.usage
        if usage is not None and usage.method != "none":
            kinds = {
                "exact": usage.exact_tokens,
                "reused": usage.reused_tokens - usage.exact_tokens,
                "recomputed": usage.recomputed_tokens,
            }
            for kind, tokens in kinds.items():
                self.context_tokens.labels(self.model, kind).inc(max(tokens, 0))
        self.e2e.observe(record.e2e_s)
        self.queue.observe(record.queue_s)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s)
            if record.completion_tokens > 1:
                decode = record.e2e_s - record.ttft_s
                self.tpot.observe(decode / (record.completion_tokens - 1))
        if record.recompute_fraction is not None:
            self.recompute.observe(record.recompute_fraction)
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        self.cached_prompt_tokens.inc(record.cached_tokens)

    def render(self, openmetrics_format: bool = False) -> bytes:
        if openmetrics_format:
            return openmetrics.generate_latest(self.registry)
        return generate_latest(self.registry)


router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse, responses=PROMETHEUS_TEXT)
def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    if "application/openmetrics-text" in request.headers.get("accept", ""):
        body = service_metrics.render(openmetrics_format=True)
        return Response(body, media_type=openmetrics.CONTENT_TYPE_LATEST)
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
