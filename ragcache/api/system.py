"""Health and chunk-cache routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from ragcache.api.deps import get_service
from ragcache.service import RagCache

router = APIRouter()
health_router = APIRouter()


@health_router.get("/health")
def health(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return {"status": "ok", "model": service.loaded.name}


@router.get("/v1/cache/stats")
def cache_stats(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return service.cache_stats()


@router.post("/v1/cache/clear")
def cache_clear(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    return service.cache_clear()
