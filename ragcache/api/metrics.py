"""Prometheus /metrics, names under ``ragcache:``, one CollectorRegistry per app.

Request histograms and token counters are fed by the service's generation records;
engine, chunk-store and ingestion state is read when the endpoint is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ragcache.service import GenerationRecord, RagCache

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)


class _StateCollector(Collector):
    """Gauges and counters read from the service at scrape time."""

    def __init__(self, service: RagCache) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        engine = service.async_engine.run_sync(lambda e: e.stats())
        yield _gauge("num_requests_running", "requests decoding now", engine["num_running"])
        yield _gauge("num_requests_waiting", "requests waiting to start", engine["num_waiting"])
        yield _gauge("kv_cache_usage_perc", "share of KV blocks in use (0-1)", engine["usage"])
        yield _counter(
            "prefix_cache_queries", "engine prefix-cache block lookups",
            engine["prefix_cache_queries"],
        )  # fmt: skip
        yield _counter(
            "prefix_cache_hits", "engine prefix-cache block hits", engine["prefix_cache_hits"]
        )
        yield _gauge("lora_adapters_loaded", "LoRA adapters served", engine["lora_adapters"])
        yield _gauge(
            "lora_adapters_resident",
            "LoRA adapters in device slots",
            engine["lora_adapters_resident"],
        )
        yield _counter(
            "lora_slot_loads", "LoRA adapters copied into a device slot", engine["lora_slot_loads"]
        )
        yield from _speculation_metrics(engine)
        yield from _chunk_store_metrics(service.chunk_cache.stats())
        totals = service.ingest_totals
        yield _counter("documents_ingested", "documents added or replaced", totals.documents)
        yield _counter("chunks_ingested", "chunks added by ingestion", totals.chunks)
        yield _gauge("ingest_jobs_running", "ingest jobs running now", totals.jobs_running)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"ragcache:{name}", documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"ragcache:{name}", documentation, value=value)


def _speculation_metrics(engine: dict[str, float]) -> Iterator[Metric]:
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


def _chunk_store_metrics(stats: dict[str, object]) -> Iterator[Metric]:
    hits = CounterMetricFamily(
        "ragcache:chunk_cache_hits", "chunk KV lookups served, by tier", labels=["tier"]
    )
    stored = GaugeMetricFamily(
        "ragcache:chunk_cache_bytes", "bytes of chunk KV held, by tier", labels=["tier"]
    )
    entries = GaugeMetricFamily(
        "ragcache:chunk_cache_entries", "chunk KV entries held, by tier", labels=["tier"]
    )
    tiers = stats["tiers"]
    assert isinstance(tiers, dict)
    for tier, values in tiers.items():
        hits.add_metric([tier], values["hits"])
        stored.add_metric([tier], values["bytes"])
        entries.add_metric([tier], values["entries"])
    misses = stats["misses"]
    assert isinstance(misses, int)
    yield hits
    yield _counter("chunk_cache_misses", "chunk KV lookups that found nothing", misses)
    yield stored
    yield entries


class ServiceMetrics:
    def __init__(self, service: RagCache) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        registry = self.registry

        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"ragcache:{name}", text, buckets=buckets, registry=registry)

        def counter(name: str, text: str) -> Counter:
            return Counter(f"ragcache:{name}", text, registry=registry)

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
        registry.register(_StateCollector(service))

    def observe(self, record: GenerationRecord) -> None:
        self.requests.inc()
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

    def render(self) -> bytes:
        return generate_latest(self.registry)


router = APIRouter()


@router.get("/metrics")
def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
