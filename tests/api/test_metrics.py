"""Prometheus /metrics: the text parses, and its counters move as requests run."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from ragcache.api.app import create_app
from ragcache.api.metrics import chunk_store_metrics
from ragcache.engine.config import SpeculativeConfig
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded

KINDS = ("exact", "reused", "recomputed")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("metrics") / "data") as rag:
        yield rag


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


def scrape(base_url: str) -> dict[str, float]:
    """Every sample as 'name{label=value}' -> value, less the model_name label that every
    sample must carry (with one value for the whole server)."""
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    samples: dict[str, float] = {}
    models = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            models.add(sample.labels.pop("model_name"))
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    assert len(models) == 1
    return samples


def test_metrics_parse_and_move_with_requests(base_url: str, service: RagCache) -> None:
    before = scrape(base_url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"ragcache:{name}{{}}" in before
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    for _ in range(2):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Which city?"}],
            max_tokens=3,
            extra_body={"documents": ["Paris is in France.", "Rome is in Italy."]},
        )
    service.ingest([SAMPLES / "gettysburg_address.md"], "metrics", create=True)
    after = scrape(base_url)

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert moved("ragcache:e2e_request_latency_seconds_count{}") == 2
    assert moved("ragcache:time_to_first_token_seconds_count{}") == 2
    assert moved("ragcache:request_queue_time_seconds_count{}") == 2
    assert moved("ragcache:recompute_fraction_count{}") == 2
    assert moved("ragcache:prompt_tokens_total{}") > 0
    assert moved("ragcache:generation_tokens_total{}") >= 2
    assert moved("ragcache:cached_prompt_tokens_total{}") > 0
    assert moved("ragcache:chunk_cache_hits_total{tier=host}") >= 2
    assert moved("ragcache:chunk_cache_misses_total{}") >= 2
    assert after["ragcache:chunk_cache_bytes{tier=host}"] > 0
    assert moved("ragcache:request_success_total{finished_reason=length}") == 2
    assert moved("ragcache:request_prompt_tokens_count{}") == 2
    assert moved("ragcache:request_prompt_tokens_sum{}") == moved("ragcache:prompt_tokens_total{}")
    assert moved("ragcache:request_generation_tokens_sum{}") == 6
    assert 0 < after["ragcache:chunk_cache_hit_rate{}"] < 1
    assert 0 <= after["ragcache:prefix_cache_hit_rate{}"] <= 1
    assert "ragcache:num_preemptions_total{}" in after
    kinds = [f"ragcache:context_tokens_total{{kind={kind}}}" for kind in KINDS]
    assert sum(moved(name) for name in kinds) > 0
    assert "ragcache:chunk_cache_tier_errors_total{tier=host}" not in after
    assert moved("ragcache:documents_ingested_total{}") == 1
    assert moved("ragcache:chunks_ingested_total{}") >= 1
    assert after["ragcache:ingest_jobs_running{}"] == 0


def test_a_shared_tier_reports_its_errors() -> None:
    tier = {"hits": 3, "bytes": 10, "entries": 1}
    stats = {"tiers": {"host": tier, "redis": {**tier, "errors": 2, "reachable": 0}}, "misses": 1}
    families = {family.name: family for family in chunk_store_metrics(stats, "m")}
    errors = families["ragcache:chunk_cache_tier_errors"].samples
    assert [(s.labels["tier"], s.value) for s in errors] == [("redis", 2)]
    assert families["ragcache:chunk_cache_tier_reachable"].samples[0].value == 0
    assert families["ragcache:chunk_cache_hit_rate"].samples[0].value == 6 / 7


def test_both_parsers_read_the_metrics_without_created_series(base_url: str) -> None:
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    assert "_created" not in text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "ragcache:request_success" in names
    reply = httpx.get(
        f"{base_url}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=60
    )
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    assert "_created" not in reply.text and reply.text.endswith("# EOF\n")
    families = list(openmetrics_families(reply.text))
    assert {family.name for family in families} >= {
        "ragcache:request_success",
        "ragcache:request_prompt_tokens",
        "ragcache:chunk_cache_hits",
    }
    for family in families:
        assert all("model_name" in sample.labels for sample in family.samples), family.name


@pytest.fixture(scope="module")
def speculating_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server whose engine drafts every decode step with the tiny model's first layer."""
    config = tiny_config(tmp_path_factory.mktemp("speculating") / "data")
    config.service.kv_precompute = "lazy"
    config.engine.speculative = SpeculativeConfig(
        method="early_exit", draft_layers=1, num_speculative_tokens=3, adaptive=False
    )
    with (
        RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag,
        running_server(create_app(rag)) as url,
    ):
        yield url


def test_speculation_metrics_move_and_requests_can_opt_out(speculating_url: str) -> None:
    client = openai.OpenAI(base_url=f"{speculating_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    drafts = "ragcache:spec_decode_num_draft_tokens_total{}"
    before = scrape(speculating_url)
    assert before["ragcache:decode_tokens_per_step{}"] == 0.0
    client.completions.create(
        model=model, prompt="Four score and seven years ago", max_tokens=12,
        extra_body={"num_speculative_tokens": 0},
    )  # fmt: skip
    opted_out = scrape(speculating_url)
    assert opted_out[drafts] == before[drafts]
    assert opted_out["ragcache:decode_tokens_per_step{}"] == 1.0
    client.completions.create(model=model, prompt="Four score and seven years ago", max_tokens=12)
    after = scrape(speculating_url)
    assert after[drafts] > opted_out[drafts]
    assert after["ragcache:spec_decode_num_drafts_total{}"] > 0
    accepted = after["ragcache:spec_decode_num_accepted_tokens_total{}"]
    assert after["ragcache:spec_decode_acceptance_rate{}"] == pytest.approx(
        accepted / after[drafts]
    )
    assert after["ragcache:decode_tokens_per_step{}"] >= 1.0
