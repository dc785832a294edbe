"""The FastAPI app over one RagCache service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from ragcache.api import corpora, query, system
from ragcache.api.auth import parse_api_keys, require_api_key
from ragcache.api.errors import install_error_handlers
from ragcache.config import ServerConfig
from ragcache.service import RagCache


def create_app(
    service: RagCache, server: ServerConfig | None = None, close_service: bool = False
) -> FastAPI:
    """An app serving ``service``; with ``close_service`` it closes it on shutdown."""
    server = server or service.config.server

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_service:
            service.close()

    app = FastAPI(title="ragcache", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.server_config = server
    install_error_handlers(app)
    guarded = [Depends(require_api_key(parse_api_keys(server.api_keys)))]
    app.include_router(system.health_router)
    for router in (corpora.router, query.router, system.router):
        app.include_router(router, dependencies=guarded)
    return app
