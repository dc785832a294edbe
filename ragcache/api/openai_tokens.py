"""vLLM's utility routes: ``/tokenize`` (a prompt or chat messages to token ids),
``/detokenize`` (token ids to text) and ``/version``."""

from __future__ import annotations

from importlib import metadata
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import Field

from ragcache.api.deps import get_service
from ragcache.api.openai_models import served_as
from ragcache.api.openai_schemas import ChatMessage, Request
from ragcache.errors import InvalidInputError
from ragcache.service import RagCache

router = APIRouter()


class TokenizeRequest(Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def _served(service: RagCache, model: str | None) -> RagCache:
    return service if model is None else served_as(service, model)


def _tokenize(service: RagCache, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidInputError("send either prompt or messages", "prompt")
    if body.messages is not None:
        turns = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        return service.chat_prompt_ids(turns)
    assert body.prompt is not None
    return list(
        service.loaded.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    )


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, service: RagCache = Depends(get_service)) -> Any:
    service = await run_in_threadpool(_served, service, body.model)
    tokens = await run_in_threadpool(_tokenize, service, body)
    return {"count": len(tokens), "max_model_len": service.engine.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, service: RagCache = Depends(get_service)) -> Any:
    service = await run_in_threadpool(_served, service, body.model)
    vocab = service.loaded.spec.vocab_size
    bad = [token for token in body.tokens if not 0 <= token < vocab]
    if bad:
        raise InvalidInputError(
            f"tokens holds ids outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens"
        )
    return {"prompt": service.loaded.tokenizer.decode(body.tokens)}


@router.get("/version")
def version() -> dict[str, str]:
    try:
        return {"version": metadata.version("ragcache")}
    except metadata.PackageNotFoundError:
        return {"version": "unknown"}
