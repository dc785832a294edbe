"""LangChain against ragcache's OpenAI-compatible routes: ChatOpenAI with the pipeline's
own passages as `documents` (their chunk KV is cached by content), an LCEL chain with a
prompt template whose system message is kept, and `with_structured_output`.

    pip install 'ragcache[langchain]'
    ragcache serve --sample            # in another shell
    python examples/langchain_rag.py   # or: --base-url http://host:8000/v1 --api-key KEY
"""

from __future__ import annotations

import argparse
from operator import itemgetter
from typing import Any, Literal

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel
from langchain_openai import ChatOpenAI
from openai import OpenAI
from pydantic import BaseModel, Field

PASSAGES = [
    "The Declaration of Independence was drafted by Thomas Jefferson and adopted by the "
    "Second Continental Congress on July 4, 1776.",
    "Abraham Lincoln delivered the Gettysburg Address on November 19, 1863, at the "
    "dedication of the Soldiers' National Cemetery.",
    "A Tale of Two Cities, by Charles Dickens, opens in the years before the French Revolution.",
]


class Grounding(BaseModel):
    """Which passage answers the question: a bounded answer that parses every time."""

    answered: bool = Field(description="whether one of the passages answers the question")
    passage: Literal[1, 2] = Field(description="the number of the passage that answers it")


def retrieve(question: str, k: int = 2) -> list[str]:
    """The pipeline's own retriever (here: word overlap; any vector store works)."""
    words = set(question.lower().split())
    return sorted(PASSAGES, key=lambda text: -len(words & set(text.lower().split())))[:k]


def chat_model(base_url: str, api_key: str, max_tokens: int, **extra: Any) -> ChatOpenAI:
    model = OpenAI(base_url=base_url, api_key=api_key).models.list().data[0].id
    return ChatOpenAI(
        base_url=base_url,
        api_key=api_key,
        model=model,
        max_tokens=max_tokens,
        temperature=0,
        max_retries=0,
        **extra,
    )


def rag_chain(llm: ChatOpenAI) -> Runnable:
    """question -> retrieve -> prompt -> ragcache (passages as documents) -> text."""
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer in one short sentence."), ("human", "{question}")]
    )

    def answer(inputs: dict[str, Any]) -> Any:
        documents = {"documents": inputs["documents"], "fusion_method": "cacheblend"}
        return llm.invoke(inputs["messages"], extra_body=documents)

    return (
        RunnableParallel(question=lambda question: question, documents=RunnableLambda(retrieve))
        | RunnableParallel(documents=itemgetter("documents"), messages=prompt)
        | RunnableLambda(answer)
        | StrOutputParser()
    )


def run(base_url: str, api_key: str, max_tokens: int = 48) -> dict[str, Any]:
    question = "Who drafted the Declaration of Independence?"
    passages = retrieve(question)

    # 1. ChatOpenAI with the passages as the `documents` extension field.
    llm = chat_model(base_url, api_key, max_tokens)
    reply = llm.invoke(question, extra_body={"documents": passages})
    usage = reply.usage_metadata or {}
    cached = (usage.get("input_token_details") or {}).get("cache_read", 0)
    print(f"[ChatOpenAI] {reply.content!r} ({cached} prompt tokens from cache)")

    # 2. An LCEL chain: the same passages come back, so their chunk KV is reused.
    chained = rag_chain(llm).invoke(question)
    print(f"[LCEL chain] {chained!r}")

    # 3. Structured output: a parsed Grounding, constrained by its JSON schema.
    grounded = chat_model(base_url, api_key, max_tokens, extra_body={"documents": passages})
    grounding = grounded.with_structured_output(Grounding).invoke(
        f"{question} Say whether passage 1 or 2 answers it."
    )
    print(f"[structured] {grounding!r}")
    return {"chat": reply.content, "chain": chained, "structured": grounding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="a key of server.api_keys, if set")
    args = parser.parse_args()
    run(args.base_url, args.api_key)


if __name__ == "__main__":
    main()
