"""The OpenAI-compatible embeddings route, answered by the retriever's embedder."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ragcache.api.deps import get_service
from ragcache.api.errors import UnsupportedFieldError
from ragcache.api.openai_models import ModelNotFoundError
from ragcache.api.openai_schemas import EmbeddingRequest
from ragcache.errors import InvalidInputError, InvalidParameterError
from ragcache.service import RagCache

router = APIRouter()
MAX_EMBEDDING_INPUTS = 2048


def _embedding_texts(body: EmbeddingRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not 1 <= len(texts) <= MAX_EMBEDDING_INPUTS:
        raise InvalidParameterError(
            f"input holds {len(texts)} items; send 1 to {MAX_EMBEDDING_INPUTS}", "input"
        )
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise UnsupportedFieldError("input must be text; token ids are not accepted", "input")
        if not text.strip():
            raise InvalidInputError(f"input[{number}] is empty; send non-empty text", "input")
    return texts  # type: ignore[return-value]


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, service: RagCache = Depends(get_service)) -> Any:
    model = service.config.retriever.embedder
    if body.model != model:
        raise ModelNotFoundError(
            f"embedding model {body.model!r} is not served here; use {model!r}", "model"
        )
    texts = _embedding_texts(body)
    if body.dimensions is not None and body.dimensions != service.embedder.dim:
        raise UnsupportedFieldError(
            f"dimensions={body.dimensions}: this embedder gives {service.embedder.dim} only",
            "dimensions",
        )
    vectors, tokens = await run_in_threadpool(service.embed, texts)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
