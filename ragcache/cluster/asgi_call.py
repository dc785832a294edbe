"""One HTTP request, carried between Ray actors as plain data, run through an ASGI app.

The frontend turns the request it received into a ``ForwardedRequest``; a generator
replica runs it through the single server's own FastAPI app (api/app.py) and yields
the response as it is produced: first ``{"status", "headers"}``, then body pieces, so a
streamed (SSE) answer streams across the cluster too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

ASGIApp = Any


@dataclass(slots=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None = None
    routing_texts: list[str] = field(default_factory=list)
    chunk_fingerprints: list[str] = field(default_factory=list)
    tenant: str = ""
    pinned_replica: str | None = None


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": request.client,
        "server": ("127.0.0.1", 0),
        "state": {},
    }


async def run_asgi(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
    """The response of ``app`` to ``request``: its start message, then its body pieces."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    finished = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def call() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await messages.put({"type": "ragcache.done"})

    task = asyncio.create_task(call())
    try:
        while True:
            message = await messages.get()
            kind = message["type"]
            if kind == "http.response.start":
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                yield {"status": int(message["status"]), "headers": headers}
            elif kind == "http.response.body":
                body = bytes(message.get("body", b""))
                if body:
                    yield body
                if not message.get("more_body", False):
                    break
            elif kind == "ragcache.done":
                break
    finally:
        finished.set()
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
