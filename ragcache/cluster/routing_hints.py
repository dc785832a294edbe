"""What the frontend reads from an HTTP request to route it: the chunk texts its answer
will use (its ``documents``, or the chunks retrieval finds for its question in its
``corpus``). Hints only choose a replica; the replica serves the request by itself, so
a wrong or missing hint costs cache hits, never correctness."""

from __future__ import annotations

import json
from typing import Any

ANSWER_PATHS = ("/v1/query", "/v1/chat/completions", "/v1/completions")


def question_of(path: str, body: dict[str, Any]) -> str | None:
    """The text a corpus is searched with on ``path``, as the single server takes it."""
    if path == "/v1/query":
        query = body.get("query")
        return query if isinstance(query, str) else None
    if path == "/v1/completions":
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


def parse_answer_request(path: str, body: bytes) -> dict[str, Any] | None:
    """The JSON body of an answering route, or None for other routes and bad bodies."""
    if path not in ANSWER_PATHS:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def given_documents(body: dict[str, Any]) -> list[str] | None:
    documents = body.get("documents")
    if isinstance(documents, list) and all(isinstance(text, str) for text in documents):
        return documents
    return None


def retrieval_target(
    path: str, body: dict[str, Any], default_k: int
) -> tuple[str, str, int] | None:
    """(question, corpus, k) when the request answers from a corpus."""
    corpus, k = body.get("corpus"), body.get("k")
    question = question_of(path, body)
    if not isinstance(corpus, str) or question is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        k = default_k
    return question, corpus, k
