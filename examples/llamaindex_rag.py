"""LlamaIndex against ragcache's OpenAI-compatible routes: OpenAILike as the LLM and
OpenAILikeEmbedding (ragcache's /v1/embeddings) for the vector index, queried through a
standard query engine; then the same index's retriever handing its passages to ragcache
as `documents`, so their chunk KV is cached by content and reused.

    pip install 'ragcache[llamaindex]'
    ragcache serve --sample              # in another shell
    python examples/llamaindex_rag.py    # or: --base-url http://host:8000/v1 --api-key KEY
"""

from __future__ import annotations

import argparse
from typing import Any

from llama_index.core import Document, VectorStoreIndex
from llama_index.embeddings.openai_like import OpenAILikeEmbedding
from llama_index.llms.openai_like import OpenAILike
from openai import OpenAI

PASSAGES = [
    "The Declaration of Independence was drafted by Thomas Jefferson and adopted by the "
    "Second Continental Congress on July 4, 1776.",
    "Abraham Lincoln delivered the Gettysburg Address on November 19, 1863, at the "
    "dedication of the Soldiers' National Cemetery.",
    "A Tale of Two Cities, by Charles Dickens, opens in the years before the French Revolution.",
]
# SmolLM2-135M-Instruct reads 8,192 tokens; LlamaIndex counts with its own tokenizer, so
# the window it plans for is kept below that.
CONTEXT_WINDOW = 6000


def served_models(base_url: str, api_key: str) -> tuple[str, str]:
    """(generation model, embedding model): ragcache lists the embedder last."""
    cards = OpenAI(base_url=base_url, api_key=api_key).models.list().data
    return cards[0].id, cards[-1].id


def build(base_url: str, api_key: str, max_tokens: int) -> tuple[OpenAILike, VectorStoreIndex]:
    model, embedder = served_models(base_url, api_key)
    llm = OpenAILike(
        model=model,
        api_base=base_url,
        api_key=api_key,
        is_chat_model=True,
        context_window=CONTEXT_WINDOW,
        max_tokens=max_tokens,
        temperature=0.0,
        max_retries=0,
    )
    embed = OpenAILikeEmbedding(
        model_name=embedder, api_base=base_url, api_key=api_key, max_retries=0
    )
    index = VectorStoreIndex.from_documents(
        [Document(text=text) for text in PASSAGES], embed_model=embed
    )
    return llm, index


def run(base_url: str, api_key: str, max_tokens: int = 48) -> dict[str, Any]:
    question = "Who drafted the Declaration of Independence?"
    llm, index = build(base_url, api_key, max_tokens)

    # 1. A standard query engine: LlamaIndex writes the retrieved text into its prompt.
    engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    response = engine.query(question)
    print(f"[query engine] {str(response)!r} from {len(response.source_nodes)} nodes")

    # 2. The index's retriever, its passages sent as ragcache `documents` (chunk KV reuse).
    nodes = index.as_retriever(similarity_top_k=2).retrieve(question)
    documents = [node.get_content() for node in nodes]
    with_documents = llm.model_copy(
        update={"additional_kwargs": {"extra_body": {"documents": documents}}}
    )
    completion = with_documents.complete(question)
    usage = getattr(completion.raw, "usage", None)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", 0) or 0
    print(f"[documents] {completion.text!r} ({cached} prompt tokens from cache)")
    return {"query_engine": response, "documents": completion.text, "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none", help="a key of server.api_keys, if set")
    args = parser.parse_args()
    run(args.base_url, args.api_key)


if __name__ == "__main__":
    main()
