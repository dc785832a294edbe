"""HTTP middleware: request ids and CORS.

Every request gets an id: the caller's ``X-Request-Id`` when it is a short printable
token, a new one otherwise. It is echoed in the response's ``X-Request-Id``, names the
OpenAI completion (``chatcmpl-<id>``) and is put on every log record made while the
request runs (``%(request_id)s`` in a log format). CORS is off unless
``server.cors_origins`` lists the origins a browser page may call the API from.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragcache.config import ServerConfig

REQUEST_ID_HEADER = "X-Request-Id"
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context, if any."""
    return _request_id.get()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        asked = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = asked if _VALID_ID.fullmatch(asked) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        # Kept on the request too: error handlers outside this middleware still see it.
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)


def _install_log_field() -> None:
    """Log records get ``request_id`` (``-`` outside a request); installed once."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "adds_request_id", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = _request_id.get() or "-"
        return record

    make_record.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


def cors_origins(server: ServerConfig) -> list[str]:
    return [origin.strip() for origin in server.cors_origins.split(",") if origin.strip()]


def install_middleware(app: FastAPI, server: ServerConfig) -> None:
    """Request ids always; CORS for the configured origins (none: off)."""
    origins = cors_origins(server)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
        )
    # Added last, so outermost: a CORS preflight answer carries the id too.
    app.add_middleware(RequestIdMiddleware)
    _install_log_field()
