"""Running the prepared prompts of one OpenAI-style request: n choices each, merged as
they decode, answered whole or as server-sent events."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from ragcache.api.errors import error_body, error_code
from ragcache.api.middleware import current_request_id
from ragcache.api.openai_format import (
    LogprobFormatter,
    ResponseBuilder,
    rag_details,
    sse,
    usage,
)
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sampling_params import MAX_SEED, SamplingParams
from ragcache.errors import ServiceError
from ragcache.service import PreparedQuery, RagCache

log = logging.getLogger(__name__)


def _choice_samplings(base: SamplingParams, n: int) -> list[SamplingParams]:
    """Seeded requests give every choice its own seed, so n choices are not n copies
    (wrapping past the largest seed rather than overflowing it)."""
    if base.seed is None:
        return [base] * n
    return [dataclasses.replace(base, seed=(base.seed + i) % (MAX_SEED + 1)) for i in range(n)]


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


async def respond(
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
    # The sources are known before the first token: the first chunk carries them.
    rag = rag_details(generation.prompts)

    def with_sources(chunk: dict[str, Any]) -> dict[str, Any]:
        nonlocal rag
        if rag is not None:
            chunk["ragcache"], rag = rag, None
        return chunk

    try:
        if builder.chat:
            for index in range(count):
                yield sse(with_sources(builder.role_chunk(index)))
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
                yield sse(with_sources(chunk))
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


def response_builder(service: RagCache, chat: bool, model: str) -> ResponseBuilder:
    prefix = "chatcmpl" if chat else "cmpl"
    return ResponseBuilder(
        chat,
        model,
        f"{prefix}-{current_request_id() or uuid.uuid4().hex}",
        f"fp_{service.loaded.fingerprint[:12]}",
        LogprobFormatter(service.loaded.tokenizer),
    )
