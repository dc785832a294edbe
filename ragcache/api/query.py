"""Routes that read a corpus: retrieval alone, and the full RAG query (JSON or SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ragcache.api.deps import get_service
from ragcache.api.media_types import JSON_OR_EVENT_STREAM
from ragcache.api.schemas import QueryRequest, RetrieveRequest
from ragcache.errors import ServiceError
from ragcache.service import RagCache
from ragcache.service.results import QueryResult

router = APIRouter()


@router.post("/v1/retrieve")
async def retrieve(body: RetrieveRequest, service: RagCache = Depends(get_service)) -> Any:
    sources = await run_in_threadpool(service.retrieve, body.query, body.corpus, body.k)
    return {"corpus": body.corpus, "sources": [asdict(s) for s in sources]}


def _sse(event: str, payload: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n"


@router.post("/v1/query", responses=JSON_OR_EVENT_STREAM)
async def query(body: QueryRequest, service: RagCache = Depends(get_service)) -> Any:
    events = service.stream_query(
        body.query,
        body.corpus,
        k=body.k,
        method=body.method,
        method_params=body.method_params(),
        sampling=body.sampling(service.config.service.max_tokens),
    )
    # The first event comes after retrieval and fusion, so bad input still gets a 4xx.
    first = await events.__anext__()
    if not body.stream:
        result = first
        async for event in events:
            result = event
        assert isinstance(result, QueryResult)
        return result.to_dict()
    return StreamingResponse(_stream(first, events), media_type="text/event-stream")


async def _stream(
    first: str | QueryResult, events: AsyncIterator[str | QueryResult]
) -> AsyncIterator[str]:
    try:
        event = first
        while True:
            if isinstance(event, QueryResult):
                yield _sse("result", event.to_dict())
                break
            yield _sse("token", {"text": event})
            event = await events.__anext__()
    except ServiceError as error:
        yield _sse("error", {"message": error.message, "type": error.kind, "param": error.param})
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
