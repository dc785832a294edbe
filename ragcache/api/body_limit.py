"""Request body limits, enforced while the body arrives, before anything parses it.

Uploads (``POST /v1/corpora/{name}/documents``) may carry ``server.max_upload_bytes``;
every other request ``server.max_body_bytes``. A declared Content-Length above the
limit is answered 413 at once; a body without one (chunked) is counted as it is read,
and the 413 goes out as soon as the count passes the limit. The route then sees the
client as gone, and whatever it answers is dropped.
"""

from __future__ import annotations

import json
import re

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragcache.api.errors import error_body
from ragcache.config import ServerConfig

UPLOAD_PATH = re.compile(r"^/v1/corpora/[^/]+/documents/?$")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, scope: Scope) -> tuple[int, str, str | None]:
        """The byte limit of this request, the setting that sets it, the field named."""
        if scope["method"] == "POST" and UPLOAD_PATH.match(scope["path"]):
            return self.max_upload_bytes, "max_upload_bytes", "files"
        return self.max_body_bytes, "max_body_bytes", None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting, param = self._limit(scope)
        message = (
            f"the request body is larger than server.{setting}={limit} bytes; "
            f"send less, or raise server.{setting} (RAGCACHE_SERVER__{setting.upper()})"
        )
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _send_too_large(send, message, param)
            return
        received = 0
        refused = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    refused = True
                    if not response_started:
                        await _send_too_large(send, message, param)
                    return {"type": "http.disconnect"}
            return event

        async def guarded_send(event: Message) -> None:
            nonlocal response_started
            if refused:
                return
            if event["type"] == "http.response.start":
                response_started = True
            await send(event)

        await self.app(scope, counted_receive, guarded_send)


async def _send_too_large(send: Send, message: str, param: str | None) -> None:
    body = json.dumps(error_body(message, "payload_too_large", param)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def install_body_limit(app: FastAPI, server: ServerConfig) -> None:
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=server.max_body_bytes,
        max_upload_bytes=server.max_upload_bytes,
    )
