"""Screenshots of every console page for docs/console/, taken from a running server.

    ragcache serve --sample            # in another shell
    python -m tests.browser.screenshots http://127.0.0.1:8000 docs/console

It uploads two files of samples/ into a corpus `tour`, asks it a question twice (the
second answer reuses the cached chunk KV), shows the cache page while three questions
go to the sample corpus, then the reports page.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import httpx

from tests.browser.browser import ask, browser_page, create_corpus, open_page, upload, use_key

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
QUESTION = "Who wrote the Declaration of Independence?"
# Asked while the cache page samples, so its charts show lookups: two new questions on
# the sample corpus (some chunks cached, some not), then the first one again.
LATER_QUESTIONS = [
    "What did Lincoln say at Gettysburg?",
    "How does A Tale of Two Cities begin?",
    "What did Lincoln say at Gettysburg?",
]


def ask_in_background(url: str, key: str) -> threading.Thread:
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def ask_all() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
            for question in LATER_QUESTIONS:
                body = {"corpus": "sample", "query": question, "max_tokens": 16}
                http.post("/v1/query", json=body).raise_for_status()
                time.sleep(3)

    thread = threading.Thread(target=ask_all)
    thread.start()
    return thread


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
        ask_in_background(args.url, args.key).join()
        time.sleep(5)  # a few more samples after the last answer
        page.screenshot(path=str(args.out / "cache.png"), full_page=True)
        open_page(page, args.url, "reports")
        page.wait_for_selector("#report-list li.selected")
        page.screenshot(path=str(args.out / "reports.png"), full_page=True)


if __name__ == "__main__":
    main()
