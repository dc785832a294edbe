"""RAG on the OpenAI chat route keeps the client's conversation, and streamed RAG answers
carry their sources; through the official openai client against a loopback server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
SYSTEM = {"role": "system", "content": "You answer as a historian, in one short sentence."}
HISTORY = [
    {"role": "user", "content": "Who gave the Gettysburg Address?"},
    {"role": "assistant", "content": "Abraham Lincoln, in 1863."},
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RagCache]:
    with tiny_service(tmp_path_factory.mktemp("rag-chat") / "data") as rag:
        yield rag


@pytest.fixture(scope="module")
def client(service: RagCache) -> Iterator[openai.OpenAI]:
    with running_server(create_app(service)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _ask(client: openai.OpenAI, model: str, messages: Any, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, temperature=0, extra_body=extra
    )


def test_system_message_and_history_reach_the_rag_prompt(client: openai.OpenAI, model: str) -> None:
    question = [{"role": "user", "content": QUESTION}]
    bare = _ask(client, model, question, documents=DOCUMENTS)
    with_system = _ask(client, model, [SYSTEM, *question], documents=DOCUMENTS)
    with_history = _ask(client, model, [SYSTEM, *HISTORY, *question], documents=DOCUMENTS)
    sizes = [reply.usage.prompt_tokens for reply in (bare, with_system, with_history)]
    assert sizes[0] < sizes[1] < sizes[2]
    # The chunks stay where they were: their caches still apply under a conversation.
    cache = with_history.model_extra["ragcache"][0]["cache"]
    assert cache["computed_tokens"] == 0 and sum(cache["tokens_by_tier"].values()) > 0


def test_corpus_retrieval_keeps_the_conversation(
    client: openai.OpenAI, model: str, service: RagCache
) -> None:
    service.ingest([SAMPLES / "gettysburg_address.md"], "speeches", create=True)
    question = [{"role": "user", "content": QUESTION}]
    bare = _ask(client, model, question, corpus="speeches", k=1)
    with_history = _ask(client, model, [SYSTEM, *HISTORY, *question], corpus="speeches", k=1)
    assert with_history.usage.prompt_tokens > bare.usage.prompt_tokens

    def chunk_ids(reply: Any) -> list[int]:
        return [source["chunk_id"] for source in reply.model_extra["ragcache"][0]["sources"]]

    assert chunk_ids(with_history) == chunk_ids(bare)


def test_text_parts_are_rag_only_when_asked(client: openai.OpenAI, model: str) -> None:
    parts: Any = [{"type": "text", "text": text} for text in [*DOCUMENTS, QUESTION]]
    message = [{"role": "user", "content": parts}]
    plain = _ask(client, model, message)
    assert "ragcache" not in (plain.model_extra or {})
    rag = _ask(client, model, message, parts_as_documents=True)
    assert [s["text"] for s in rag.model_extra["ragcache"][0]["sources"]] == DOCUMENTS
    with pytest.raises(openai.BadRequestError, match="parts_as_documents"):
        _ask(client, model, [{"role": "user", "content": QUESTION}], parts_as_documents=True)


def test_streamed_chat_carries_the_sources_in_its_first_chunk(
    client: openai.OpenAI, model: str
) -> None:
    messages: Any = [SYSTEM, {"role": "user", "content": QUESTION}]
    whole = _ask(client, model, messages, documents=DOCUMENTS)
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=2,
            temperature=0,
            stream=True,
            extra_body={"documents": DOCUMENTS},
        )
    )
    rag = chunks[0].model_extra["ragcache"]
    assert [s["text"] for s in rag[0]["sources"]] == DOCUMENTS
    assert [s["source"] for s in rag[0]["sources"]] == [
        s["source"] for s in whole.model_extra["ragcache"][0]["sources"]
    ]
    assert rag[0]["cache"]["computed_tokens"] == 0  # cached by the whole answer
    assert all("ragcache" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_streamed_completion_carries_the_sources(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.completions.create(
            model=model,
            prompt=QUESTION,
            max_tokens=2,
            stream=True,
            extra_body={"documents": DOCUMENTS},
        )
    )
    rag = chunks[0].model_extra["ragcache"]
    assert [s["text"] for s in rag[0]["sources"]] == DOCUMENTS


def test_streamed_plain_chat_has_no_sources(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
        )
    )
    assert all("ragcache" not in (c.model_extra or {}) for c in chunks)


def test_langchain_prompt_template_instructions_reach_the_model(
    client: openai.OpenAI, model: str
) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.prompts import ChatPromptTemplate

    chat = langchain_openai.ChatOpenAI(
        base_url=str(client.base_url),
        api_key="unused",
        model=model,
        max_tokens=2,
        temperature=0,
        max_retries=0,
        extra_body={"documents": DOCUMENTS},
    )
    bare = ChatPromptTemplate.from_messages([("user", "{question}")]) | chat
    instructed = (
        ChatPromptTemplate.from_messages(
            [("system", "Answer only from the documents, citing them."), ("user", "{question}")]
        )
        | chat
    )
    sizes = [
        chain.invoke({"question": QUESTION}).usage_metadata["input_tokens"]
        for chain in (bare, instructed)
    ]
    assert sizes[0] < sizes[1]
