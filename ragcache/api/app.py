"""The FastAPI app over one RagCache service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from ragcache.api import corpora, docs, lora, metrics, openai_routes, query, system
from ragcache.api.admission import Admission, request_slot
from ragcache.api.auth import AccessKeys, require_admin_key, require_api_key
from ragcache.api.body_limit import install_body_limit
from ragcache.api.errors import install_error_handlers
from ragcache.api.metrics import ServiceMetrics
from ragcache.api.middleware import install_middleware
from ragcache.api.ui import install_console
from ragcache.config import ServerConfig
from ragcache.service import RagCache


def create_app(
    service: RagCache, server: ServerConfig | None = None, close_service: bool = False
) -> FastAPI:
    """An app serving ``service``; with ``close_service`` it closes it on shutdown.

    Tenant routes (corpora, queries, OpenAI-compatible routes) take any API key and see
    only the key's tenant; cache routes, LoRA adapter loading and /metrics take admin keys;
    the API docs take any key unless server.public_docs; the console's pages at /ui are
    public and its data routes take any key. A key setting that does not parse
    raises ConfigError naming it.
    """
    server = server or service.config.server
    keys = AccessKeys(server.api_keys, server.admin_keys)
    docs_behind_key = keys.enabled and not server.public_docs
    service_metrics = ServiceMetrics(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.observers.append(service_metrics.observe)
        try:
            yield
        finally:
            service.observers.remove(service_metrics.observe)
            if close_service:
                service.close()

    # The docs routes come from docs.router, which can take the key check.
    app = FastAPI(
        title="ragcache",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.state.server_config = server
    app.state.metrics = service_metrics
    app.state.admission = Admission(server)
    install_error_handlers(app)
    install_body_limit(app, server)
    install_middleware(app, server)
    tenant = [Depends(require_api_key(keys)), Depends(request_slot)]
    admin = [Depends(require_admin_key(keys))]
    app.include_router(system.health_router)
    for router in (corpora.router, query.router, openai_routes.router):
        app.include_router(router, dependencies=tenant)
    app.include_router(docs.router, dependencies=tenant if docs_behind_key else [])
    for router in (system.router, lora.router, metrics.router):
        app.include_router(router, dependencies=admin)
    install_console(app, tenant)
    return app
