"""The API's own documentation (/openapi.json, /docs, /redoc) as plain routes, so that
they can sit behind the API-key check when keys are set (server.public_docs opens them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

router = APIRouter(include_in_schema=False)


def _schema_url(request: Request) -> str:
    return request.scope.get("root_path", "") + "/openapi.json"


@router.get("/openapi.json")
def openapi(request: Request) -> dict[str, Any]:
    return request.app.openapi()


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=_schema_url(request), title=f"{request.app.title} - Swagger UI"
    )


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=_schema_url(request), title=f"{request.app.title} - ReDoc")
