"""Request ids and CORS against a loopback server: ids are taken from X-Request-Id or
made, echoed, name the completion and mark log records; CORS is off by default and
answers only the configured origins."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import httpx
import openai
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service

ORIGIN = "https://console.example.com"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("middleware") / "data") as rag:
        yield rag


@pytest.fixture(scope="module")
def plain_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


@pytest.fixture(scope="module")
def cors_url(service: RagCache) -> Iterator[str]:
    configured = dataclasses.replace(
        service.config.server,
        cors_origins=f"{ORIGIN}, http://localhost:3000",
        api_keys="sk-one=alpha",
    )
    with running_server(create_app(service, configured)) as url:
        yield url


def test_request_id_is_echoed_and_names_the_completion(
    plain_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = openai.OpenAI(base_url=f"{plain_url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    with caplog.at_level(logging.WARNING, logger="ragcache.api.openai_schemas"):
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=2,
            extra_headers={"X-Request-Id": "trace-42"},
            extra_body={"not_a_field": 1},
        )
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().id == "chatcmpl-trace-42"
    warned = [r for r in caplog.records if "not_a_field" in r.getMessage()]
    assert warned and all(getattr(r, "request_id", None) == "trace-42" for r in warned)


def test_request_ids_are_made_when_missing_or_unusable(plain_url: str) -> None:
    with httpx.Client(base_url=plain_url) as http:
        made = {http.get("/health").headers["x-request-id"] for _ in range(2)}
        assert len(made) == 2
        bad = http.get("/health", headers={"X-Request-Id": "has spaces\tand tabs"})
        assert bad.headers["x-request-id"] != "has spaces\tand tabs"
        missing = http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
        assert missing.status_code == 400 and missing.headers["x-request-id"]


def test_cors_is_off_by_default(plain_url: str) -> None:
    reply = httpx.get(f"{plain_url}/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in reply.headers
    preflight = httpx.options(
        f"{plain_url}/v1/chat/completions",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_answers_the_configured_origins_only(cors_url: str) -> None:
    preflight = httpx.options(
        f"{cors_url}/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["x-request-id"]
    reply = httpx.get(
        f"{cors_url}/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer sk-one"}
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in reply.headers["access-control-expose-headers"].lower()
    refused = httpx.options(
        f"{cors_url}/v1/chat/completions",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in refused.headers
    no_key = httpx.get(f"{cors_url}/v1/models", headers={"Origin": ORIGIN})
    assert no_key.status_code == 401
    assert no_key.headers["access-control-allow-origin"] == ORIGIN
