"""Screenshots of every console page for docs/console/, taken from a running server.

    ragcache serve --sample            # in another shell
    python -m tests.browser.screenshots http://127.0.0.1:8000 docs/console

It uploads two files of samples/ into a corpus `tour`, asks it a question twice (the
second answer reuses the cached chunk KV), then shows the cache and reports pages.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tests.browser.browser import ask, browser_page, create_corpus, open_page, upload, use_key

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
QUESTION = "Who wrote the Declaration of Independence?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="base URL of a running ragcache server")
    parser.add_argument("out", type=Path, help="folder the PNG files are written to")
    parser.add_argument("--key", default="", help="API key, if the server needs one")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(SAMPLES.iterdir())[:2]
    with browser_page(width=1360, height=900) as page:
        open_page(page, args.url, "corpora")
        if args.key:
            use_key(page, args.key)
        create_corpus(page, "tour")
        upload(page, files)
        page.screenshot(path=str(args.out / "corpora.png"), full_page=True)
        open_page(page, args.url, "query")
        ask(page, "tour", QUESTION, "cacheblend", "0.15")
        ask(page, "tour", QUESTION, "cacheblend", "0.15")
        page.screenshot(path=str(args.out / "query.png"), full_page=True)
        open_page(page, args.url, "cache")
        time.sleep(7)  # a few samples, so the charts have lines
        page.screenshot(path=str(args.out / "cache.png"), full_page=True)
        open_page(page, args.url, "reports")
        page.wait_for_selector("#report-list li.selected")
        page.screenshot(path=str(args.out / "reports.png"), full_page=True)


if __name__ == "__main__":
    main()
