"""A RAG pipeline that keeps its own retrieval and talks to ragcache with the official
openai client: chunk KV is cached by content, so documents that come back in later
questions are not prefilled again.

    ragcache serve --sample            # in another shell
    python examples/openai_rag.py      # or: --base-url http://host:8000/v1 --api-key KEY
"""

from __future__ import annotations

import argparse

from openai import OpenAI

KNOWLEDGE = [
    "Four score and seven years ago our fathers brought forth on this continent a new "
    "nation, conceived in Liberty, and dedicated to the proposition that all men are "
    "created equal.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it "
    "was the age of foolishness.",
    "We hold these truths to be self-evident, that all men are created equal, that they "
    "are endowed by their Creator with certain unalienable Rights.",
]


def retrieve(question: str, k: int = 2) -> list[str]:
    """The pipeline's own retriever (here: word overlap; any vector store works)."""
    words = set(question.lower().split())
    return sorted(KNOWLEDGE, key=lambda text: -len(words & set(text.lower().split())))[:k]


def run(base_url: str, api_key: str, max_tokens: int = 64) -> list[str]:
    client = OpenAI(base_url=base_url, api_key=api_key)
    model = client.models.list().data[0].id
    question = "What were all men created?"
    documents = retrieve(question)

    # 1. The retrieved chunks as extra-body `documents`; the user message is the question.
    with_documents = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        extra_body={"documents": documents, "fusion_method": "cacheblend"},
    )
    # 2. The same chunks as content parts: every part but the last is a chunk.
    parts = [{"type": "text", "text": text} for text in [*documents, question]]
    with_parts = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": parts}],
        max_tokens=max_tokens,
        extra_body={"parts_as_documents": True},
    )
    answers = []
    for label, reply in (("documents", with_documents), ("content parts", with_parts)):
        usage = reply.usage
        cached = usage.prompt_tokens_details.cached_tokens if usage else 0
        prompt = usage.prompt_tokens if usage else 0
        print(f"[{label}] {cached}/{prompt} prompt tokens from cache")
        print(f"  {reply.choices[0].message.content!r}")
        answers.append(reply.choices[0].message.content or "")
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="a key of server.api_keys, if set")
    args = parser.parse_args()
    run(args.base_url, args.api_key)


if __name__ == "__main__":
    main()
