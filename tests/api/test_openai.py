"""The official openai client against a real ragcache server: chat, completions,
embeddings, RAG three ways, usage with cached tokens, and errors in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ragcache.api.app import create_app
from ragcache.service import RagCache
from tests.api.live_server import running_server, tiny_service
from tests.service_helpers import SAMPLES

DOCUMENTS = [
    "Four score and seven years ago our fathers brought forth on this continent a new nation.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
]
QUESTION = "Which nation was brought forth?"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("openai") / "data") as rag:
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


@pytest.fixture(scope="module")
def corpus(service: RagCache) -> str:
    service.ingest([SAMPLES / "gettysburg_address.md"], "speeches", create=True)
    return "speeches"


def test_models_lists_the_served_model_and_embedder(
    client: openai.OpenAI, service: RagCache
) -> None:
    ids = [card.id for card in client.models.list().data]
    assert ids == [service.loaded.name, service.config.retriever.embedder]
    assert client.models.retrieve(ids[0]).id == ids[0]


def test_plain_chat_whole_and_streamed_agree(client: openai.OpenAI, model: str) -> None:
    messages: Any = [{"role": "user", "content": "Tell me about liberty."}]
    whole = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_repeated_plain_chat_reports_prefix_cache_hits(client: openai.OpenAI, model: str) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief. " * 20},
        {"role": "user", "content": "Hi"},
    ]
    usages = [
        client.chat.completions.create(model=model, messages=messages, max_tokens=2).usage
        for _ in range(2)
    ]
    assert usages[1] is not None and usages[1].prompt_tokens_details is not None
    assert usages[1].prompt_tokens_details.cached_tokens > 0


def test_documents_are_cached_by_content(client: openai.OpenAI, model: str) -> None:
    def ask() -> Any:
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=4,
            temperature=0,
            extra_body={"documents": DOCUMENTS, "fusion_method": "cacheblend"},
        )

    first, second = ask(), ask()
    assert first.choices[0].message.content == second.choices[0].message.content
    cache_first = first.model_extra["ragcache"][0]["cache"]
    cache_second = second.model_extra["ragcache"][0]["cache"]
    assert cache_first["computed_tokens"] > 0 and cache_first["tokens_by_tier"] == {}
    assert cache_second["computed_tokens"] == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= sum(
        cache_second["tokens_by_tier"].values()
    )
    assert second.usage.prompt_tokens_details.cached_tokens > (
        first.usage.prompt_tokens_details.cached_tokens
    )


def test_content_parts_send_chunks_and_the_question(client: openai.OpenAI, model: str) -> None:
    parts: Any = [{"type": "text", "text": text} for text in [*DOCUMENTS, QUESTION]]
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": parts}],
        max_tokens=3,
        extra_body={"fusion_method": "legolink", "legolink_k": 4, "parts_as_documents": True},
    )
    rag = reply.model_extra["ragcache"][0]
    assert [s["text"] for s in rag["sources"]] == DOCUMENTS
    assert rag["cache"]["method"] == "legolink"
    # The same documents sent as `documents` hit the chunk cache the parts filled.
    again = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=3,
        extra_body={"documents": DOCUMENTS, "fusion_method": "legolink"},
    )
    assert again.model_extra["ragcache"][0]["cache"]["computed_tokens"] == 0


def test_cachefocus_marks_the_documents_it_pruned(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=3,
        extra_body={"documents": DOCUMENTS, "fusion_method": "cachefocus", "focus_keep": 0.5},
    )
    rag = reply.model_extra["ragcache"][0]
    assert rag["cache"]["method"] == "cachefocus" and rag["cache"]["pruned_chunks"] == 1
    assert [s["pruned"] for s in rag["sources"]].count(True) == 1
    assert reply.usage is not None and rag["cache"]["pruned_tokens"] > 0


def test_corpus_retrieval_through_chat_streamed(
    client: openai.OpenAI, model: str, corpus: str
) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What did Lincoln say about the nation?"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"corpus": corpus, "k": 2, "fusion_method": "full_reuse"},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 50


def test_completions_with_documents_n_logprobs_and_stop(client: openai.OpenAI, model: str) -> None:
    reply = client.completions.create(
        model=model,
        prompt=QUESTION,
        max_tokens=4,
        n=3,
        seed=7,
        temperature=1.0,
        logprobs=2,
        stop=["\n\n\n"],
        extra_body={"documents": DOCUMENTS},
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.tokens
        assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens)
        assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert reply.usage.completion_tokens == sum(
        len(c.logprobs.tokens) for c in reply.choices if c.logprobs
    )


def test_completions_streamed_match_whole(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "Four score and", "max_tokens": 5}
    whole = client.completions.create(temperature=0, **kwargs)
    pieces = list(client.completions.create(temperature=0, stream=True, **kwargs))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text


def test_stop_sequence_truncates_the_answer(client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": "It was the best of", "temperature": 0}
    free = client.completions.create(max_tokens=8, **kwargs).choices[0].text
    assert len(free) > 2
    stopped = client.completions.create(max_tokens=8, stop=[free[1:3]], **kwargs).choices[0]
    assert stopped.text == free[: free.index(free[1:3])] and stopped.finish_reason == "stop"


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob <= 0 for entry in content)


def test_embeddings_float_and_base64(client: openai.OpenAI, service: RagCache) -> None:
    name = service.config.retriever.embedder
    reply = client.embeddings.create(model=name, input=["liberty", "union"])
    assert [len(item.embedding) for item in reply.data] == [service.embedder.dim] * 2
    floats = client.embeddings.create(model=name, input="liberty", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)
    assert reply.usage.prompt_tokens > 0


BAD: dict[str, tuple[str, dict[str, Any] | bytes, int, str | None]] = {
    "chat malformed json": ("/v1/chat/completions", b'{"model": ', 400, None),
    "chat wrong type": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    "chat unknown model": ("/v1/chat/completions", {"model": "gpt-9"}, 404, "model"),
    "chat n too large": ("/v1/chat/completions", {"n": 9}, 400, "n"),
    "chat bad temperature": ("/v1/chat/completions", {"temperature": -1}, 400, "temperature"),
    "chat bad method": (
        "/v1/chat/completions",
        {"documents": ["x"], "fusion_method": "magic"},
        400,
        "fusion_method",
    ),
    "chat unknown corpus": ("/v1/chat/completions", {"corpus": "nope"}, 404, "corpus"),
    "chat too long": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "liberty and union " * 2000}]},
        400,
        "messages",
    ),
    "chat empty document": ("/v1/chat/completions", {"documents": [" "]}, 400, "documents"),
    "chat top_logprobs alone": ("/v1/chat/completions", {"top_logprobs": 2}, 400, "top_logprobs"),
    "chat bad draft length": (
        "/v1/chat/completions",
        {"num_speculative_tokens": 99},
        400,
        "num_speculative_tokens",
    ),
    "completion bad tokens": ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    "completion too long": (
        "/v1/completions",
        {"prompt": "liberty and union " * 2000},
        400,
        "prompt",
    ),
    "completion echo": ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    "embedding empty": ("/v1/embeddings", {"input": ""}, 400, "input"),
    "embedding unknown model": ("/v1/embeddings", {"input": "x", "model": "ada"}, 404, "model"),
}


def _bad_body(path: str, patch: dict[str, Any], model: str, embedder: str) -> dict[str, Any]:
    if path == "/v1/embeddings":
        return {"model": embedder, **patch}
    base: dict[str, Any] = {"model": model, "max_tokens": 2}
    if path == "/v1/chat/completions":
        base["messages"] = [{"role": "user", "content": "hi"}]
    return {**base, **patch}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(
    base_url: str, model: str, service: RagCache, case: str
) -> None:
    path, body, status, param = BAD[case]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        if isinstance(body, bytes):
            headers = {"content-type": "application/json"}
            response = http.post(path, content=body, headers=headers)
        else:
            payload = _bad_body(path, body, model, service.config.retriever.embedder)
            response = http.post(path, json=payload)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code", "request_id"}
        assert error["request_id"] == response.headers["x-request-id"]
        assert error["message"] and error["type"] and error["param"] == param
        good = {"/v1/completions": {"prompt": "ok"}, "/v1/embeddings": {"input": "ok"}}
        payload = _bad_body(path, good.get(path, {}), model, service.config.retriever.embedder)
        assert http.post(path, json=payload).status_code == 200


def test_client_raises_typed_errors(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "x"}], n=50
        )
    assert too_many.value.param == "n"


def test_example_pipeline_runs_against_the_server(base_url: str, model: str) -> None:
    import runpy

    example = Path(__file__).resolve().parents[2] / "examples" / "openai_rag.py"
    namespace = runpy.run_path(str(example))
    answers = namespace["run"](f"{base_url}/v1", "unused", max_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
