"""The console's routes on a loopback server with API keys: the pages and static files are
public, the settings and reports routes take a key, report names are checked."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ragcache.api.app import create_app
from ragcache.blending.registry import METHOD_NAMES
from tests.api.live_server import running_server, tiny_service

KEY = {"Authorization": "Bearer sk-console"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("reports")
    sweep = {
        "command": "ragcache eval --questions 50",
        "summary": {"full_prefill": {"speedup": 1.0}, "cacheblend-0.15": {"speedup": 3.1}},
    }
    (folder / "sweep.json").write_text(json.dumps(sweep))
    (folder / "bench.json").write_text(json.dumps({"command": "ragcache bench tiers"}))
    (folder / "broken.json").write_text("{not json")
    (folder / "notes.md").write_text("not a report")
    return folder


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, reports: Path) -> Iterator[str]:
    with tiny_service(tmp_path_factory.mktemp("console_routes") / "data") as service:
        server = dataclasses.replace(
            service.config.server, api_keys="sk-console=team", reports_dir=str(reports)
        )
        with running_server(create_app(service, server)) as base:
            yield base


def test_pages_and_static_files_need_no_key(url: str) -> None:
    with httpx.Client(base_url=url) as http:
        root = http.get("/ui")
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
        page = http.get("/ui/")
        assert page.status_code == 200 and "/ui/static/main.js" in page.text
        script = http.get("/ui/static/main.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert http.get("/ui/static/console.css").status_code == 200
        assert http.get("/ui/static/missing.js").status_code == 404


def test_console_pages_load_nothing_from_the_network(url: str) -> None:
    static = Path(__file__).resolve().parents[2] / "ragcache" / "api" / "ui_static"
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
        assert "https://" not in text, path.name


def test_settings_take_a_key_and_list_the_methods(url: str) -> None:
    assert httpx.get(f"{url}/ui/api/settings").status_code == 401
    settings = httpx.get(f"{url}/ui/api/settings", headers=KEY).json()
    assert settings["methods"] == list(METHOD_NAMES)
    assert settings["method"] in METHOD_NAMES
    assert settings["max_k"] >= 1


def test_reports_are_listed_and_read(url: str, reports: Path) -> None:
    assert httpx.get(f"{url}/ui/api/reports").status_code == 401
    listing = httpx.get(f"{url}/ui/api/reports", headers=KEY).json()
    assert listing["folder"] == str(reports)
    by_name = {entry["name"]: entry for entry in listing["data"]}
    assert set(by_name) == {"sweep.json", "bench.json", "broken.json"}
    assert by_name["sweep.json"]["kind"] == "fusion"
    assert by_name["bench.json"]["kind"] == "other"
    assert by_name["broken.json"]["readable"] is False
    sweep = httpx.get(f"{url}/ui/api/reports/sweep.json", headers=KEY).json()
    assert sweep["summary"]["cacheblend-0.15"]["speedup"] == 3.1


def test_bad_report_names_get_a_4xx_naming_the_problem(url: str) -> None:
    with httpx.Client(base_url=url, headers=KEY) as http:
        outside = http.get("/ui/api/reports/..%2Fsecret.json")
        assert outside.status_code in (400, 404)
        not_json = http.get("/ui/api/reports/notes.md")
        assert not_json.status_code == 400
        assert "ending in .json" in not_json.json()["error"]["message"]
        missing = http.get("/ui/api/reports/absent.json")
        assert missing.status_code == 404 and "absent.json" in missing.json()["error"]["message"]
        broken = http.get("/ui/api/reports/broken.json")
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
