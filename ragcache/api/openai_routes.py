"""OpenAI-compatible routes: chat and text completions (whole or SSE); the model and
embedding routes are included from openai_models.py and openai_embeddings.py.

``model`` is the base model's name or a loaded LoRA adapter's: an adapter answers with
its own chunk caches and prefix cache, and /v1/models lists it with the base as parent.
RAG rides on the same bodies: ``corpus`` retrieves from an uploaded corpus, ``documents``
sends the caller's own chunks, and ``parts_as_documents`` sends the last user message's
text parts but the last as chunks and the last as the question. The client's system
messages and earlier turns are kept: they follow the fused chunks through the chat
template, before the question (docs/openai.md). Without any of them a chat is an
ordinary chat through the model's chat template, text parts joined by newlines.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ragcache.api import openai_embeddings, openai_models, openai_tokens
from ragcache.api.deps import get_server_config, get_service
from ragcache.api.errors import UnsupportedFieldError
from ragcache.api.media_types import JSON_OR_EVENT_STREAM
from ragcache.api.openai_generation import Generation, respond, response_builder
from ragcache.api.openai_models import served_as
from ragcache.api.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    RagFields,
)
from ragcache.api.openai_structured import guided_sampling
from ragcache.blending.registry import METHOD_NAMES
from ragcache.config import ServerConfig
from ragcache.engine.sampling_params import SamplingParams
from ragcache.errors import (
    InvalidInputError,
    InvalidParameterError,
)
from ragcache.service import PreparedQuery, RagCache

router = APIRouter()
router.include_router(openai_models.router)
router.include_router(openai_embeddings.router)
router.include_router(openai_tokens.router)
MAX_PROMPTS = 32


def _check_generation(body: GenerationFields, server: ServerConfig) -> None:
    if not 1 <= body.n <= server.max_n:
        raise InvalidParameterError(
            f"n={body.n} is invalid; expected 1 to {server.max_n} (server.max_n)", "n"
        )
    if body.logit_bias:
        raise UnsupportedFieldError("logit_bias is not supported; leave it out", "logit_bias")
    if body.corpus is not None and body.documents is not None:
        raise InvalidInputError("send either corpus or documents, not both", "documents")
    if body.fusion_method is not None and body.fusion_method not in METHOD_NAMES:
        raise InvalidParameterError(
            f"fusion_method {body.fusion_method!r} is unknown; use one of "
            f"{', '.join(METHOD_NAMES)}",
            "fusion_method",
        )
    if body.k is not None and body.corpus is None:
        raise InvalidInputError("k only applies with corpus (server-side retrieval)", "k")


def _prepare_rag(
    service: RagCache,
    body: RagFields,
    question: str,
    sampling: SamplingParams,
    conversation: list[tuple[str, str]] | None = None,
) -> PreparedQuery:
    """The RAG prompt of a request that names a corpus or sends documents."""
    method, params = body.fusion_method, body.method_params()
    turns = conversation or []
    if body.documents is not None:
        return service.prepare_documents(
            body.documents, question, method, params, sampling, "documents", turns
        )
    assert body.corpus is not None
    return service.prepare_corpus(question, body.corpus, body.k, method, params, sampling, turns)


# ---- chat completions -----------------------------------------------------------------


def _chat_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidParameterError("top_logprobs needs logprobs=true", "top_logprobs")
    if not body.logprobs:
        return None
    return 0 if body.top_logprobs is None else body.top_logprobs


def _check_chat_fields(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise UnsupportedFieldError("tools are not supported; leave them out", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise UnsupportedFieldError("tool_choice is not supported without tools", "tool_choice")


def _turns(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    return [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]


def _prepare_chat(
    service: RagCache, body: ChatCompletionRequest, sampling: SamplingParams
) -> PreparedQuery:
    last = body.messages[-1]
    method, params = body.fusion_method, body.method_params()
    by_parts = body.parts_as_documents
    if not (by_parts or body.corpus is not None or body.documents is not None):
        return service.prepare_prompt(service.chat_prompt_ids(_turns(body)), sampling, "messages")
    if last.role != "user":
        raise InvalidInputError(
            "a RAG request answers the last message, which must come from the user", "messages"
        )
    conversation = _turns(body)[:-1]
    if by_parts:
        parts = last.content if isinstance(last.content, list) else []
        if len(parts) < 2:
            raise InvalidInputError(
                "parts_as_documents needs a last user message of two text parts or more "
                "(documents, then the question)",
                "messages",
            )
        if body.corpus is not None or body.documents is not None:
            raise InvalidInputError(
                "the last message's text parts already carry the documents; "
                "leave out corpus and documents",
                "messages",
            )
        question = parts[-1].text
        if not question.strip():
            raise InvalidInputError("the last text part (the question) is empty", "messages")
        documents = [part.text for part in parts[:-1]]
        return service.prepare_documents(
            documents, question, method, params, sampling, "messages", conversation
        )
    question = last.text()
    if not question.strip():
        raise InvalidInputError("the last user message is empty; send a question", "messages")
    return _prepare_rag(service, body, question, sampling, conversation)


@router.post("/v1/chat/completions", responses=JSON_OR_EVENT_STREAM)
async def chat_completions(
    body: ChatCompletionRequest,
    service: RagCache = Depends(get_service),
    server: ServerConfig = Depends(get_server_config),
) -> Any:
    _check_generation(body, server)
    _check_chat_fields(body)
    service = await run_in_threadpool(served_as, service, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = body.sampling(max_tokens or service.config.service.max_tokens, _chat_logprobs(body))
    sampling = await run_in_threadpool(guided_sampling, service, body.response_format, sampling)
    prepared = await run_in_threadpool(_prepare_chat, service, body, sampling)
    generation = Generation(service, [prepared], body.n, body.logprobs)
    builder = response_builder(service, True, body.model)
    return await respond(generation, builder, body.stream, body.include_usage)


# ---- text completions -----------------------------------------------------------------


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(item, int) for item in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise InvalidParameterError(
            f"prompt holds {len(prompts)} prompts; send 1 to {MAX_PROMPTS}", "prompt"
        )
    return prompts


def _prepare_completion(
    service: RagCache, body: CompletionRequest, prompt: str | list[int], sampling: SamplingParams
) -> PreparedQuery:
    if body.corpus is None and body.documents is None:
        ids = service.prompts.encode(prompt) if isinstance(prompt, str) else prompt
        return service.prepare_prompt(ids, sampling, "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(
            "with corpus or documents, the prompt is the question text", "prompt"
        )
    return _prepare_rag(service, body, prompt, sampling)


@router.post("/v1/completions", responses=JSON_OR_EVENT_STREAM)
async def completions(
    body: CompletionRequest,
    service: RagCache = Depends(get_service),
    server: ServerConfig = Depends(get_server_config),
) -> Any:
    _check_generation(body, server)
    service = await run_in_threadpool(served_as, service, body.model)
    if body.echo:
        raise UnsupportedFieldError("echo is not supported; leave it out", "echo")
    if body.suffix:
        raise UnsupportedFieldError("suffix is not supported; leave it out", "suffix")
    if body.best_of not in (None, body.n):
        raise UnsupportedFieldError("best_of must equal n (or be left out)", "best_of")
    prompts = _prompts(body)
    sampling = body.sampling(body.max_tokens or service.config.service.max_tokens, body.logprobs)
    sampling = await run_in_threadpool(guided_sampling, service, body.response_format, sampling)
    prepared = [
        await run_in_threadpool(_prepare_completion, service, body, prompt, sampling)
        for prompt in prompts
    ]
    generation = Generation(service, prepared, body.n, body.logprobs is not None)
    builder = response_builder(service, False, body.model)
    return await respond(generation, builder, body.stream, body.include_usage)
