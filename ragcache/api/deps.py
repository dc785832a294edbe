"""The service and server config behind every route, stored on the app's state."""

from __future__ import annotations

from fastapi import Request

from ragcache.config import ServerConfig
from ragcache.service import RagCache


def get_service(request: Request) -> RagCache:
    """The service as the caller's tenant sees it (set by the API-key check)."""
    service: RagCache = request.app.state.service
    return service.for_tenant(getattr(request.state, "tenant", ""))


def get_server_config(request: Request) -> ServerConfig:
    return request.app.state.server_config
