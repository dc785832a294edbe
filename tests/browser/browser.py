"""Debian's chromium driven by Playwright (never a downloaded browser), and the steps a
person takes in the console, shared by the browser tests and the screenshot script."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
TIMEOUT_MS = 120_000


def chromium_path() -> str:
    for path in CHROMIUM_PATHS:
        if Path(path).is_file():
            return path
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Debian's chromium is missing: apt-get install -y chromium (make test does)")
    return found


@contextmanager
def browser_page(width: int = 1280, height: int = 860) -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_page(page: Page, base_url: str, name: str) -> None:
    """Shows console page ``name`` and waits until its data has loaded."""
    if not page.url.startswith(f"{base_url}/ui/"):
        page.goto(f"{base_url}/ui/#{name}")
    else:
        page.evaluate(f"location.hash = '#{name}'")
    page.wait_for_function(
        f"document.body.dataset.page === '{name}' && document.body.dataset.ready === 'true'"
    )


def use_key(page: Page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button")
    page.wait_for_function("document.body.dataset.ready === 'true'")


def create_corpus(page: Page, name: str) -> None:
    page.fill("#new-corpus-name", name)
    page.click("#create-corpus button")
    page.wait_for_selector(f"#corpus-table tr[data-corpus='{name}'].selected")


def upload(page: Page, files: list[Path]) -> str:
    """Uploads ``files`` into the selected corpus; returns the notice once ingested."""
    page.set_input_files("#upload-files", [str(f) for f in files])
    page.click("#upload-form button")
    page.wait_for_function(
        "document.getElementById('upload-status').textContent.startsWith('done')"
        " || document.getElementById('upload-status').textContent === 'failed'"
    )
    return page.inner_text("#notice")


def ask(page: Page, corpus: str, question: str, method: str, budget: str | None) -> None:
    page.select_option("#query-corpus", corpus)
    page.select_option("#query-method", method)
    if budget is not None:
        page.fill("#query-budget", budget)
    page.fill("#query-text", question)
    page.click("#query-form button")
    page.wait_for_function("document.getElementById('answer').dataset.state === 'done'")
