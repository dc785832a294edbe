"""Sampling values the engine cannot hold are refused at the boundary with a 4xx naming
the parameter, a max_tokens past the context is refused with the limit, and bad requests
sent beside good ones leave the good ones untouched: against a real server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"

# (route, fields, the parameter the 400 names)
BAD: dict[str, tuple[str, dict[str, Any], str]] = {
    "seed past 64 bits": (COMPLETIONS, {"seed": 2**64}, "seed"),
    "negative seed": (CHAT, {"seed": -1}, "seed"),
    "top_k past int64": (COMPLETIONS, {"top_k": 2**63}, "top_k"),
    "max_tokens 2**63": (COMPLETIONS, {"max_tokens": 2**63}, "max_tokens"),
    "max_tokens 0": (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
    "chat max_tokens 0": (CHAT, {"max_tokens": 0}, "max_tokens"),
    "max_completion_tokens 0": (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    "huge n": (CHAT, {"n": 10**30}, "n"),
    "logprobs 21": (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    "top_logprobs past 20": (CHAT, {"logprobs": True, "top_logprobs": 2**70}, "top_logprobs"),
    "temperature above 2": (CHAT, {"temperature": 2.5}, "temperature"),
    "negative temperature": (COMPLETIONS, {"temperature": -0.1}, "temperature"),
    "top_p 0": (COMPLETIONS, {"top_p": 0.0}, "top_p"),
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("validation") / "data") as rag:
        yield rag


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


@pytest.fixture(scope="module")
def model(base_url: str) -> str:
    return httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]


def body(route: str, model: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": model, "max_tokens": 3, "temperature": 0}
    if route == CHAT:
        base["messages"] = [{"role": "user", "content": "Four score and seven"}]
    else:
        base["prompt"] = "Four score and seven"
    return {**base, **fields}


@pytest.mark.parametrize("case", list(BAD))
def test_unrepresentable_values_get_a_400_naming_the_parameter(
    base_url: str, model: str, case: str
) -> None:
    route, fields, param = BAD[case]
    response = httpx.post(f"{base_url}{route}", json=body(route, model, **fields), timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error


def test_native_query_refuses_the_same_values(base_url: str) -> None:
    for fields, param in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"top_k": 2**63}, "top_k"),
        ({"temperature": 3.0}, "temperature"),
    ]:
        payload = {"query": "Who spoke?", "corpus": "none", **fields}
        response = httpx.post(f"{base_url}/v1/query", json=payload, timeout=60)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == param


def test_max_tokens_past_the_context_is_refused_with_the_limit(
    base_url: str, model: str, service: RagCache
) -> None:
    limit = service.engine.max_model_len
    for route in (CHAT, COMPLETIONS):
        for stream in (False, True):
            payload = body(route, model, max_tokens=limit, stream=stream)
            response = httpx.post(f"{base_url}{route}", json=payload, timeout=60)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert f"max_tokens={limit} is more than the" in error["message"]
            assert f"hold {limit} tokens" in error["message"]
            assert error["param"] == "max_tokens"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="send max_tokens <="):
        client.completions.create(model=model, prompt="Four score", max_tokens=limit)


def test_seeded_choices_near_the_largest_seed_wrap(base_url: str, model: str) -> None:
    payload = body(COMPLETIONS, model, seed=2**64 - 1, n=2, temperature=1.0)
    response = httpx.post(f"{base_url}{COMPLETIONS}", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


def test_bad_requests_beside_good_ones_leave_the_good_ones_untouched(
    base_url: str, model: str, service: RagCache
) -> None:
    good_body = body(COMPLETIONS, model, max_tokens=6)
    bad_bodies = [(route, body(route, model, **fields)) for route, fields, _ in BAD.values()]
    # Two that pass the schema and reach the engine before it refuses them.
    limit = service.engine.max_model_len
    bad_bodies.append((COMPLETIONS, body(COMPLETIONS, model, max_tokens=limit)))
    bad_bodies.append((COMPLETIONS, body(COMPLETIONS, model, prompt=[10**9])))

    async def main() -> tuple[list[httpx.Response], list[httpx.Response], str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            alone = await http.post(COMPLETIONS, json=good_body)
            good = [http.post(COMPLETIONS, json=good_body) for _ in range(4)]
            bad = [http.post(route, json=payload) for route, payload in bad_bodies]
            responses = await asyncio.gather(*good, *bad)
            return list(responses[: len(good)]), list(responses[len(good) :]), alone.text

    good, bad, alone = asyncio.run(main())
    assert [response.status_code for response in bad] == [400] * len(bad_bodies)
    assert all(response.status_code == 200 for response in good)
    expected = httpx.Response(200, text=alone).json()["choices"][0]["text"]
    assert all(response.json()["choices"][0]["text"] == expected for response in good)
    stats = service.async_engine.run_sync(lambda engine: engine.stats())
    assert stats["num_running"] == stats["num_waiting"] == 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
