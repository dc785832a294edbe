"""The console at /ui in a real headless chromium against a loopback server with API keys:
create a corpus, upload with progress, query with a method and budget (streamed answer,
sources with their cache marks, TTFT), the cache and reports pages, delete a document."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from ragcache.api.app import create_app
from tests.api.live_server import running_server, tiny_service
from tests.browser.browser import ask, browser_page, create_corpus, open_page, upload, use_key

pytestmark = pytest.mark.browser

REPORTS = Path(__file__).resolve().parents[2] / "eval" / "reports"
ADMIN_KEY = "sk-admin-console"
USER_KEY = "sk-user-console"


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tiny_service(tmp_path_factory.mktemp("console") / "data") as service:
        server = dataclasses.replace(
            service.config.server,
            api_keys=f"{USER_KEY}=team",
            admin_keys=f"{ADMIN_KEY}=team",
            reports_dir=str(REPORTS),
        )
        with running_server(create_app(service, server)) as url:
            yield url


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    with browser_page() as opened:
        yield opened


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("docs")
    texts = {
        "rivers.txt": "The Danube flows through ten countries and ends in the Black Sea. " * 6,
        "peaks.md": "# Peaks\n\nMount Elbrus is the highest mountain in Europe. " * 6,
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    return sorted(folder.iterdir())


def test_without_a_key_the_page_asks_for_one(page: Page, base_url: str) -> None:
    open_page(page, base_url, "corpora")
    page.wait_for_selector("#notice:not([hidden])")
    assert "API key" in page.inner_text("#notice")
    assert page.locator("#corpus-table tbody tr").count() == 0


def test_upload_query_see_sources_and_delete(
    page: Page, base_url: str, documents: list[Path]
) -> None:
    use_key(page, ADMIN_KEY)
    open_page(page, base_url, "corpora")
    create_corpus(page, "atlas")
    notice = upload(page, documents)
    assert "2 added" in notice, notice
    assert page.get_attribute("#upload-bar", "value") == "1"
    rows = page.locator("#document-table tbody tr")
    assert rows.count() == 2
    assert {Path(s).name for s in rows.locator("td:nth-child(2)").all_inner_texts()} == {
        "rivers.txt",
        "peaks.md",
    }

    open_page(page, base_url, "query")
    ask(page, "atlas", "Where does the Danube end?", "cacheblend", "0.3")
    assert page.inner_text("#answer").strip()
    sources = page.locator("#sources li")
    assert sources.count() >= 1
    marks = sources.locator(".badge").all_inner_texts()
    assert all(re.fullmatch(r"cached: \w+|computed now|pruned", m) for m in marks), marks
    assert page.inner_text("[data-figure='method']") == "cacheblend"
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", page.inner_text("[data-figure='TTFT (server)']"))
    assert page.locator("#kv-use [data-mark='repaired']").count() == 1

    # The same question again: its chunks' KV now comes from the cache tiers.
    ask(page, "atlas", "Where does the Danube end?", "legolink", "8")
    assert "cached: " in " ".join(page.locator("#sources .badge").all_inner_texts())
    assert page.inner_text("[data-figure='method']") == "legolink"

    open_page(page, base_url, "corpora")
    page.click("#corpus-table tr[data-corpus='atlas'] a")
    page.wait_for_selector("#document-table tbody tr")
    peaks = page.locator("#document-table tbody tr", has_text="peaks.md")
    doc_id = peaks.get_attribute("data-doc")
    peaks.locator("button").click()
    page.wait_for_selector(f"#document-table tr[data-doc='{doc_id}']", state="detached")
    assert page.locator("#document-table tbody tr").count() == 1
    assert f"deleted {doc_id}" in page.inner_text("#notice")


def _ingest_and_ask(base_url: str, documents: list[Path]) -> None:
    """Queries from another client while the cache page samples the tiers."""
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=base_url, headers=auth, timeout=120) as http:
        http.post("/v1/corpora", json={"name": "tiers"}).raise_for_status()
        files = [("files", (doc.name, doc.read_bytes())) for doc in documents]
        job = http.post("/v1/corpora/tiers/documents", files=files).json()
        while http.get(f"/v1/jobs/{job['job_id']}").json()["status"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        for _ in range(2):
            body = {"corpus": "tiers", "query": "Which mountain is highest?", "max_tokens": 2}
            http.post("/v1/query", json=body).raise_for_status()
            time.sleep(2.5)  # past the page's sampling interval


def test_cache_page_plots_tiers_over_time(page: Page, base_url: str, documents: list[Path]) -> None:
    use_key(page, ADMIN_KEY)
    open_page(page, base_url, "cache")
    page.wait_for_selector("#tier-table tr[data-tier='host']")
    _ingest_and_ask(base_url, documents)
    page.wait_for_function("document.querySelectorAll('#hits-chart path').length > 0")
    assert page.locator("#bytes-chart path").count() >= 1


def test_cache_page_needs_an_admin_key(page: Page, base_url: str) -> None:
    use_key(page, USER_KEY)
    open_page(page, base_url, "cache")
    page.wait_for_selector("#notice:not([hidden])")
    assert "403" in page.inner_text("#notice")
    assert "request " in page.inner_text("#notice")


def test_reports_page_plots_a_fusion_sweep(page: Page, base_url: str) -> None:
    use_key(page, USER_KEY)
    open_page(page, base_url, "reports")
    page.wait_for_selector("#report-list li[data-kind='fusion'].selected")
    assert page.is_visible("#report-chart")
    assert page.locator("#report-chart circle").count() >= 3
    assert "ragcache eval" in page.inner_text("#report-command")
    page.click("#report-list li[data-report='bench_tiers.json']")
    page.wait_for_function(
        "document.getElementById('report-title').textContent === 'bench_tiers.json'"
    )
    assert page.is_hidden("#report-chart")
