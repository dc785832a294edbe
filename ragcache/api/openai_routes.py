"""OpenAI-compatible routes: models, chat and text completions (whole or SSE), embeddings.

``model`` is the base model's name or a loaded LoRA adapter's: an adapter answers with
its own chunk caches and prefix cache, and /v1/models lists it with the base as parent.
RAG rides on the same bodies: ``corpus`` retrieves from an uploaded corpus, ``documents``
sends the caller's own chunks, and a last user message made of text parts sends its
parts but the last as chunks and the last as the question. Without any of them a chat
is an ordinary chat through the model's chat template.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ragcache.api.deps import get_server_config, get_service
from ragcache.api.errors import error_body, error_code
from ragcache.api.openai_format import (
    LogprobFormatter,
    ResponseBuilder,
    rag_details,
    sse,
    usage,
)
from ragcache.api.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationFields,
)
from ragcache.blending.registry import METHOD_NAMES
from ragcache.config import ServerConfig
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sampling_params import SamplingParams
from ragcache.errors import (
    InvalidInputError,
    InvalidParameterError,
    NotFoundError,
    ServiceError,
)
from ragcache.service import PreparedQuery, RagCache

log = logging.getLogger(__name__)
router = APIRouter()
MAX_PROMPTS = 32
MAX_EMBEDDING_INPUTS = 2048


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class UnsupportedFieldError(InvalidInputError):
    code = "unsupported_parameter"


def _served(service: RagCache, name: str) -> RagCache:
    """The service answering as model ``name``: the base model or one of its adapters."""
    if name == service.loaded.name:
        return service
    if any(info.name == name for info in service.list_adapters()):
        return service.for_adapter(name)
    raise _unknown_model(service, name)


def _unknown_model(service: RagCache, name: str) -> ModelNotFoundError:
    served = ", ".join(repr(card["id"]) for card in _generation_cards(service))
    return ModelNotFoundError(
        f"model {name!r} is not served here; use one of {served} (see GET /v1/models)", "model"
    )


def _model_card(model_id: str, parent: str | None = None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": 0, "owned_by": "ragcache"}
    if parent is not None:
        card["parent"] = parent
    return card


def _generation_cards(service: RagCache) -> list[dict[str, Any]]:
    base = service.loaded.name
    return [
        _model_card(base),
        *(_model_card(info.name, base) for info in service.list_adapters()),
    ]


def _all_cards(service: RagCache) -> list[dict[str, Any]]:
    return [*_generation_cards(service), _model_card(service.config.retriever.embedder)]


@router.get("/v1/models")
def list_models(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return {"object": "list", "data": _all_cards(service)}


@router.get("/v1/models/{model_id:path}")
def get_model(model_id: str, service: RagCache = Depends(get_service)) -> dict[str, Any]:
    for card in _all_cards(service):
        if card["id"] == model_id:
            return card
    raise _unknown_model(service, model_id)


# ---- shared checks and execution ---------------------------------------------------------


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


def _choice_samplings(base: SamplingParams, n: int) -> list[SamplingParams]:
    """Seeded requests give every choice its own seed, so n choices are not n copies."""
    if base.seed is None:
        return [base] * n
    return [dataclasses.replace(base, seed=base.seed + i) for i in range(n)]


async def _merge(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncGenerator[tuple[int, RequestOutput]]:
    """Outputs of several generations as they come, tagged with the stream's index."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as error:
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass(slots=True)
class Generation:
    """Prepared prompts and n choices of each; choice c answers prompt c // n."""

    service: RagCache
    prompts: list[PreparedQuery]
    n: int
    logprobs: bool

    def streams(self) -> list[AsyncIterator[RequestOutput]]:
        out = []
        for prepared in self.prompts:
            for sampling in _choice_samplings(prepared.sampling, self.n):
                out.append(self.service.generate(prepared, sampling))
        return out


async def _respond(
    generation: Generation, builder: ResponseBuilder, stream: bool, include_usage: bool
) -> Any:
    merged = _merge(generation.streams())
    try:
        # Waiting for the first output keeps engine refusals a 4xx, not a broken stream.
        first = await anext(merged)
    except BaseException:
        await merged.aclose()
        raise
    if not stream:
        finals: list[RequestOutput | None] = [None] * (len(generation.prompts) * generation.n)
        index, out = first
        finals[index] = out
        async for index, out in merged:
            finals[index] = out
        body_usage = usage(generation.prompts, finals, generation.n)
        done = [out for out in finals if out is not None]
        return builder.whole(done, body_usage, generation.logprobs, rag_details(generation.prompts))
    events = _stream_events(generation, builder, first, merged, include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


async def _stream_events(
    generation: Generation,
    builder: ResponseBuilder,
    first: tuple[int, RequestOutput],
    merged: AsyncGenerator[tuple[int, RequestOutput]],
    include_usage: bool,
) -> AsyncIterator[str]:
    count = len(generation.prompts) * generation.n
    finals: list[RequestOutput | None] = [None] * count
    logprobs_sent = [0] * count
    text_sent = [0] * count
    try:
        if builder.chat:
            for index in range(count):
                yield sse(builder.role_chunk(index))
        item: tuple[int, RequestOutput] | None = first
        while item is not None:
            index, out = item
            finals[index] = out
            chunk = builder.piece_chunk(
                index, out, logprobs_sent[index], text_sent[index], generation.logprobs
            )
            logprobs_sent[index] = len(out.logprobs)
            text_sent[index] += len(out.new_text)
            if out.new_text or out.finished or (generation.logprobs and out.logprobs):
                yield sse(chunk)
            item = await anext(merged, None)
        if include_usage:
            yield sse(builder.usage_chunk(usage(generation.prompts, finals, generation.n)))
    except ServiceError as error:
        yield sse(error_body(error.message, error.kind, error.param, error_code(error)))
    except Exception as error:
        log.exception("a streamed completion failed")
        yield sse(error_body(f"internal error: {type(error).__name__}", "internal_error", None))
    finally:
        await merged.aclose()
    yield "data: [DONE]\n\n"


def _builder(service: RagCache, chat: bool, model: str) -> ResponseBuilder:
    prefix = "chatcmpl" if chat else "cmpl"
    return ResponseBuilder(
        chat,
        model,
        f"{prefix}-{uuid.uuid4().hex[:24]}",
        f"fp_{service.loaded.fingerprint[:12]}",
        LogprobFormatter(service.loaded.tokenizer),
    )


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
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise UnsupportedFieldError(
            "response_format supports only {'type': 'text'}", "response_format"
        )


def _prepare_chat(
    service: RagCache, body: ChatCompletionRequest, sampling: SamplingParams
) -> PreparedQuery:
    last = body.messages[-1]
    parts = last.content if isinstance(last.content, list) else None
    method, params = body.fusion_method, body.method_params()
    with_parts = parts is not None and len(parts) > 1
    if not (with_parts or body.corpus is not None or body.documents is not None):
        messages = [
            ("system" if m.role == "developer" else m.role, m.text()) for m in body.messages
        ]
        return service.prepare_prompt(service.chat_prompt_ids(messages), sampling, "messages")
    if last.role != "user":
        raise InvalidInputError(
            "a RAG request answers the last message, which must come from the user", "messages"
        )
    if parts is not None and with_parts:
        if body.corpus is not None or body.documents is not None:
            raise InvalidInputError(
                "the last message's text parts already carry the documents; "
                "leave out corpus and documents",
                "messages",
            )
        documents = [part.text for part in parts[:-1]]
        question = parts[-1].text
        if not question.strip():
            raise InvalidInputError("the last text part (the question) is empty", "messages")
        return service.prepare_documents(documents, question, method, params, sampling, "messages")
    question = last.text()
    if not question.strip():
        raise InvalidInputError("the last user message is empty; send a question", "messages")
    if body.documents is not None:
        return service.prepare_documents(body.documents, question, method, params, sampling)
    assert body.corpus is not None
    return service.prepare_corpus(question, body.corpus, body.k, method, params, sampling)


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    service: RagCache = Depends(get_service),
    server: ServerConfig = Depends(get_server_config),
) -> Any:
    _check_generation(body, server)
    _check_chat_fields(body)
    service = await run_in_threadpool(_served, service, body.model)
    max_tokens = body.max_completion_tokens or body.max_tokens
    sampling = body.sampling(max_tokens or service.config.service.max_tokens, _chat_logprobs(body))
    prepared = await run_in_threadpool(_prepare_chat, service, body, sampling)
    generation = Generation(service, [prepared], body.n, body.logprobs)
    builder = _builder(service, True, body.model)
    return await _respond(generation, builder, body.stream, body.include_usage)


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
    method, params = body.fusion_method, body.method_params()
    if body.corpus is None and body.documents is None:
        ids = service.prompts.encode(prompt) if isinstance(prompt, str) else prompt
        return service.prepare_prompt(ids, sampling, "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(
            "with corpus or documents, the prompt is the question text", "prompt"
        )
    if body.documents is not None:
        return service.prepare_documents(body.documents, prompt, method, params, sampling)
    assert body.corpus is not None
    return service.prepare_corpus(prompt, body.corpus, body.k, method, params, sampling)


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest,
    service: RagCache = Depends(get_service),
    server: ServerConfig = Depends(get_server_config),
) -> Any:
    _check_generation(body, server)
    service = await run_in_threadpool(_served, service, body.model)
    if body.echo:
        raise UnsupportedFieldError("echo is not supported; leave it out", "echo")
    if body.suffix:
        raise UnsupportedFieldError("suffix is not supported; leave it out", "suffix")
    if body.best_of not in (None, body.n):
        raise UnsupportedFieldError("best_of must equal n (or be left out)", "best_of")
    prompts = _prompts(body)
    sampling = body.sampling(body.max_tokens or service.config.service.max_tokens, body.logprobs)
    prepared = [
        await run_in_threadpool(_prepare_completion, service, body, prompt, sampling)
        for prompt in prompts
    ]
    generation = Generation(service, prepared, body.n, body.logprobs is not None)
    builder = _builder(service, False, body.model)
    return await _respond(generation, builder, body.stream, body.include_usage)


# ---- embeddings -----------------------------------------------------------------------


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
