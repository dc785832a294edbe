"""Every body a route sends has its media type in the route's OpenAPI entry: /metrics
(Prometheus text or OpenMetrics) and the streamed answers (server-sent events)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ragcache.api.app import create_app
from tests.api.live_server import running_server, tiny_service


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("media-types") / "data"
    with tiny_service(data) as service, running_server(create_app(service)) as url:
        with httpx.Client(base_url=url, timeout=120) as http:
            yield http


def documented(client: httpx.Client, method: str, path: str) -> set[str]:
    entry = client.get("/openapi.json").json()["paths"][path][method]
    return set(entry["responses"]["200"]["content"])


def media_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0].strip()


def test_metrics_documents_both_text_formats(client: httpx.Client) -> None:
    types = documented(client, "get", "/metrics")
    plain = client.get("/metrics")
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert plain.status_code == openmetrics.status_code == 200
    assert media_type(plain) == "text/plain" and media_type(plain) in types
    assert media_type(openmetrics) == "application/openmetrics-text" in types
    assert "application/json" not in types


def streamed(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[str, str]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return media_type(response), response.read().decode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Four score", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        ),
    ],
)
def test_streamed_answers_are_documented_beside_json(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    model = client.get("/v1/models").json()["data"][0]["id"]
    types = documented(client, "post", path)
    kind, text = streamed(client, path, {**body, "model": model})
    assert kind == "text/event-stream" and kind in types and "data:" in text
    whole = client.post(path, json={**body, "model": model})
    assert whole.status_code == 200 and media_type(whole) == "application/json" in types
    assert documented(client, "post", "/v1/query") >= {"application/json", "text/event-stream"}
