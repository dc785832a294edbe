"""The service and server config behind every route, stored on the app's state."""

from __future__ import annotations

from fastapi import Request

from ragcache.config import ServerConfig
from ragcache.service import RagCache


def get_service(request: Request) -> RagCache:
    return request.app.state.service


def get_server_config(request: Request) -> ServerConfig:
    return request.app.state.server_config
