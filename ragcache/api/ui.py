"""The web console at /ui: static pages (HTML, JS, CSS shipped in ``ui_static/``, no build
step, nothing fetched from the network) that call the API with the key typed into the page.

The pages themselves are public, as they hold no data; every call they make carries the
key as a bearer token and passes the same checks as any client's. Two routes exist for the
console alone: the fusion methods a query may name, and the evaluation reports found in
``server.reports_dir``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ragcache.api.deps import get_server_config, get_service
from ragcache.blending.registry import METHOD_NAMES
from ragcache.config import ServerConfig
from ragcache.errors import InvalidInputError, NotFoundError
from ragcache.service import RagCache

STATIC_DIR = Path(__file__).with_name("ui_static")
REPORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}\.json")

pages = APIRouter(include_in_schema=False)
router = APIRouter()


@pages.get("/ui")
def console_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@pages.get("/ui/")
def console_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/api/settings")
def console_settings(service: RagCache = Depends(get_service)) -> dict[str, Any]:
    """What the query playground offers: the methods and the service's defaults."""
    fusion = service.config.fusion
    return {
        "model": service.loaded.name,
        "methods": list(METHOD_NAMES),
        "method": fusion.method,
        "recompute_ratio": fusion.recompute_ratio,
        "legolink_k": fusion.legolink_k,
        "focus_keep": fusion.focus_keep,
        "max_tokens": service.config.service.max_tokens,
        "max_k": service.config.service.max_k,
    }


def _reports_dir(server: ServerConfig) -> Path:
    return Path(server.reports_dir).expanduser()


def _summary(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"name": path.name, "readable": False}
    if not isinstance(report, dict):
        return {"name": path.name, "readable": True, "command": None, "kind": "other"}
    summary = report.get("summary")
    plottable = isinstance(summary, dict) and all(
        isinstance(row, dict) and "speedup" in row for row in summary.values()
    )
    return {
        "name": path.name,
        "readable": True,
        "command": report.get("command"),
        "kind": "fusion" if plottable and summary else "other",
    }


@router.get("/ui/api/reports")
def list_reports(server: ServerConfig = Depends(get_server_config)) -> dict[str, Any]:
    folder = _reports_dir(server)
    if not folder.is_dir():
        return {"folder": str(folder), "data": []}
    names = sorted(p for p in folder.glob("*.json") if REPORT_NAME.fullmatch(p.name))
    return {"folder": str(folder), "data": [_summary(p) for p in names]}


@router.get("/ui/api/reports/{name}")
def read_report(name: str, server: ServerConfig = Depends(get_server_config)) -> Any:
    if not REPORT_NAME.fullmatch(name):
        raise InvalidInputError(
            f"report name {name[:80]!r} is not a plain file name ending in .json", "name"
        )
    path = _reports_dir(server) / name
    if not path.is_file():
        raise NotFoundError(f"no report {name!r} in {_reports_dir(server)}", "name")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"report {name!r} is not valid JSON: {error}", "name") from None


def install_console(app: FastAPI, dependencies: list[Any]) -> None:
    """The pages and static files at /ui; the console's data routes behind ``dependencies``."""
    app.include_router(pages)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.include_router(router, dependencies=dependencies)
