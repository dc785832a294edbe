"""Every error body carries the request id that X-Request-Id echoes, against a loopback
server: native 4xx, OpenAI-route 400s, auth failures and body-limit 413s."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import openai
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("error_ids") / "data") as rag:
        yield rag


@pytest.fixture(scope="module")
def url(service: RagCache) -> Iterator[str]:
    server = dataclasses.replace(service.config.server, max_body_bytes=4096)
    with running_server(create_app(service, server)) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_url(service: RagCache) -> Iterator[str]:
    server = dataclasses.replace(service.config.server, api_keys="sk-user=alpha")
    with running_server(create_app(service, server)) as base:
        yield base


def _error(reply: httpx.Response) -> dict:
    return reply.json()["error"]


def test_native_errors_carry_the_callers_request_id(url: str) -> None:
    with httpx.Client(base_url=url) as http:
        missing = http.get("/v1/corpora/nowhere", headers={"X-Request-Id": "trace-404"})
        assert missing.status_code == 404
        assert _error(missing)["request_id"] == "trace-404"
        invalid = http.post("/v1/query", json={"corpus": "x"}, headers={"X-Request-Id": "q-1"})
        assert invalid.status_code == 422
        assert _error(invalid)["request_id"] == "q-1" == invalid.headers["x-request-id"]


def test_a_made_request_id_is_the_one_in_the_header(url: str) -> None:
    reply = httpx.get(f"{url}/v1/corpora/nowhere")
    assert reply.status_code == 404
    assert _error(reply)["request_id"] == reply.headers["x-request-id"]
    assert len(reply.headers["x-request-id"]) == 32


def test_openai_client_errors_carry_the_request_id(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=client.models.list().data[0].id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=0,
            extra_headers={"X-Request-Id": "trace-400"},
        )
    assert caught.value.body["request_id"] == "trace-400"
    assert caught.value.response.headers["x-request-id"] == "trace-400"


def test_body_limit_and_auth_errors_carry_the_request_id(url: str, keyed_url: str) -> None:
    too_big = httpx.post(
        f"{url}/v1/retrieve",
        content=b"{" + b" " * 8192 + b"}",
        headers={"content-type": "application/json", "X-Request-Id": "big-1"},
    )
    assert too_big.status_code == 413
    assert _error(too_big)["request_id"] == "big-1"
    no_key = httpx.get(f"{keyed_url}/v1/corpora", headers={"X-Request-Id": "auth-1"})
    assert no_key.status_code == 401
    assert _error(no_key)["request_id"] == "auth-1"
