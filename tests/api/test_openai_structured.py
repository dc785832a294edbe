"""Structured output and vLLM's utility routes against a loopback server: JSON schemas
enforced by constrained decoding (through the openai client's own ``parse`` helper),
unknown request fields ignored and logged, /tokenize, /detokenize, /version."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service

pytest.importorskip("llguidance")


class Verdict(BaseModel):
    """Bounded, so that a random-weight model's answer ends well within max_tokens."""

    ok: bool
    grade: Literal["A", "B", "C"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("structured") / "data") as rag:
        yield rag


@pytest.fixture(scope="module")
def base_url(service: RagCache) -> Iterator[str]:
    with running_server(create_app(service)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


MESSAGES: Any = [{"role": "user", "content": "Grade this answer as JSON."}]


def test_json_schema_output_parses_into_the_schema(client: openai.OpenAI, model: str) -> None:
    # A random-weight model left alone writes no JSON; the grammar makes every answer fit.
    reply = client.beta.chat.completions.parse(
        model=model,
        messages=MESSAGES,
        response_format=Verdict,
        max_tokens=40,
        temperature=1.0,
        seed=3,
        n=3,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict)


def test_json_schema_streamed_is_json(client: openai.OpenAI, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 8}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    chunks = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=40,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        extra_body={"documents": ["The answer is yes."]},
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert set(json.loads(text)) == {"answer"}


def test_completions_take_response_format(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(
        model=model,
        prompt="Grade this answer as JSON:",
        max_tokens=40,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "verdict", "schema": Verdict.model_json_schema()},
            }
        },
    )
    assert Verdict.model_validate_json(reply.choices[0].text)


def test_json_object_mode_writes_an_object(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = reply.choices[0].message.content or ""
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "a"}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nothing"}}},
    ],
)
def test_bad_response_format_is_a_400_naming_it(
    client: openai.OpenAI, model: str, response_format: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=2, response_format=response_format
        )
    assert refused.value.body["param"] == "response_format"  # type: ignore[index]


def test_unknown_fields_are_ignored_and_logged(
    client: openai.OpenAI, model: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ragcache.api.openai_schemas"):
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi", "refusal": None}],  # type: ignore[misc]
            max_tokens=2,
            extra_body={"guided_whitespace_pattern": " ", "documnets": ["x"]},
        )
    assert reply.choices[0].message.content is not None
    assert "ragcache" not in (reply.model_extra or {})
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "documnets" in logged and "guided_whitespace_pattern" in logged and "refusal" in logged


def test_tokenize_detokenize_and_version(base_url: str, service: RagCache, model: str) -> None:
    with httpx.Client(base_url=base_url) as http:
        text = "Four score and seven years ago"
        tokens = http.post("/tokenize", json={"model": model, "prompt": text}).json()
        assert tokens["tokens"] == service.loaded.tokenizer.encode(text)
        assert tokens["count"] == len(tokens["tokens"])
        assert tokens["max_model_len"] == service.engine.max_model_len
        back = http.post("/detokenize", json={"model": model, "tokens": tokens["tokens"]})
        assert back.json()["prompt"] == service.loaded.tokenizer.decode(tokens["tokens"])
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": text}]})
        assert chat.json()["count"] > tokens["count"]
        assert http.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
        assert http.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert http.get("/version").json()["version"]


def test_langchain_with_structured_output_returns_the_schema(base_url: str, model: str) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",
        model=model,
        max_tokens=40,
        temperature=0,
        max_retries=0,
    )
    answer = chat.with_structured_output(Verdict).invoke("Grade this answer as JSON.")
    assert isinstance(answer, Verdict)
