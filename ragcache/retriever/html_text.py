"""Readable text of an HTML page: tags, scripts and styles dropped, paragraphs kept."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

_SKIPPED = frozenset({"script", "style", "noscript", "template", "svg", "head"})
_BLOCKS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "figcaption",
        "figure",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "td",
        "th",
        "tr",
        "ul",
    }
)
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "wbr"})
_PARAGRAPH = "\x00"


class _TextCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self._skip_depth = 0
        self._pre_depth = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIPPED and tag not in _VOID:
            self._skip_depth += 1
        if tag == "pre":
            self._pre_depth += 1
        if tag in _BLOCKS:
            self.parts.append(_PARAGRAPH)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS:
            self.parts.append(_PARAGRAPH)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIPPED and self._skip_depth:
            self._skip_depth -= 1
        if tag == "pre" and self._pre_depth:
            self._pre_depth -= 1
        if tag in _BLOCKS:
            self.parts.append(_PARAGRAPH)

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)
        elif not self._skip_depth:
            # Inside <pre> line breaks are content; elsewhere they are layout.
            self.parts.append(data.replace("\n", _PARAGRAPH) if self._pre_depth else data)


def html_to_text(html: str) -> tuple[str, dict[str, Any]]:
    """Text with one blank line between blocks, and {'title': ...} when the page has one."""
    collector = _TextCollector()
    collector.feed(html)
    collector.close()
    blocks = "".join(collector.parts).split(_PARAGRAPH)
    paragraphs = [re.sub(r"\s+", " ", block).strip() for block in blocks]
    text = "\n\n".join(paragraph for paragraph in paragraphs if paragraph)
    title = re.sub(r"\s+", " ", "".join(collector.title_parts)).strip()
    return text, ({"title": title} if title else {})
