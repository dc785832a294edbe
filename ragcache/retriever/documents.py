"""Documents parsed from uploaded files: text, Markdown, HTML, PDF and JSON records."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragcache.retriever.html_text import html_to_text

ACCEPTED_TYPES: tuple[str, ...] = (
    ".txt",
    ".md",
    ".markdown",
    ".html",
    ".htm",
    ".pdf",
    ".jsonl",
    ".json",
)
_RECORD_KEYS = ("id", "text", "metadata")


class DocumentError(ValueError):
    """An input file that cannot become documents; the message names the file and why."""

    def __init__(self, source: str, problem: str) -> None:
        accepted = ", ".join(ACCEPTED_TYPES)
        super().__init__(f"{source}: {problem} (accepted types: {accepted})")
        self.source = source
        self.problem = problem


@dataclass(slots=True)
class Document:
    doc_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def content_id(data: bytes) -> str:
    """Stable id of a document without an explicit one: same bytes, same id, any process."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def parse_path(path: str | Path, metadata: dict[str, Any] | None = None) -> list[Document]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DocumentError(str(path), f"cannot be read ({error.strerror or error})") from error
    return parse_bytes(data, str(path), metadata)


def parse_bytes(
    data: bytes, filename: str, metadata: dict[str, Any] | None = None
) -> list[Document]:
    """Documents in one file's bytes; the file name's suffix picks the format."""
    suffix = Path(filename).suffix.lower()
    if suffix not in ACCEPTED_TYPES:
        shown = suffix or "no file extension"
        raise DocumentError(filename, f"unsupported file type '{shown}'")
    base = {"filename": Path(filename).name, "type": suffix.lstrip("."), **(metadata or {})}
    if suffix in (".jsonl", ".json"):
        return _parse_records(data, filename, suffix, base)
    if suffix == ".pdf":
        text, extra = _pdf_text(data, filename)
    elif suffix in (".html", ".htm"):
        text, extra = html_to_text(_decode(data, filename))
    else:
        text, extra = _decode(data, filename), {}
    return [Document(content_id(data), _require_text(text, filename), {**base, **extra}, filename)]


def _decode(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentError(
            source,
            f"is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})",
        ) from error
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _require_text(text: str, source: str) -> str:
    if not text.strip():
        raise DocumentError(source, "contains no text")
    return text


def _pdf_text(data: bytes, source: str) -> tuple[str, dict[str, Any]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError(source, "is an encrypted PDF")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as error:
        raise DocumentError(source, f"is not a readable PDF ({error})") from error
    text = "\n\n".join(page for page in pages if page)
    if not text:
        raise DocumentError(source, "PDF has no extractable text (scanned pages need OCR)")
    return text.replace("\r\n", "\n"), {"pages": len(pages)}


def _parse_records(data: bytes, filename: str, suffix: str, base: dict[str, Any]) -> list[Document]:
    text = _decode(data, filename)
    if suffix == ".jsonl":
        entries = [
            (f"{filename}:{number}", _load_json(line, f"{filename}:{number}"))
            for number, line in enumerate(text.split("\n"), start=1)
            if line.strip()
        ]
    else:
        loaded = _load_json(text, filename)
        if isinstance(loaded, list):
            entries = [(f"{filename}[{i}]", item) for i, item in enumerate(loaded)]
        else:
            entries = [(filename, loaded)]
    if not entries:
        raise DocumentError(filename, "contains no records")
    documents = [_record(item, where, base) for where, item in entries]
    seen: dict[str, str] = {}
    for document in documents:
        if document.doc_id in seen:
            raise DocumentError(
                document.source,
                f"duplicate document id '{document.doc_id}' (first at {seen[document.doc_id]})",
            )
        seen[document.doc_id] = document.source
    return documents


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DocumentError(
            source, f"malformed JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error


def _record(item: Any, source: str, base: dict[str, Any]) -> Document:
    """A JSON record {id?, text, metadata?}; other top-level keys join its metadata."""
    if not isinstance(item, dict):
        raise DocumentError(
            source,
            f"record must be a JSON object with keys {_RECORD_KEYS}, got {type(item).__name__}",
        )
    text = item.get("text")
    if not isinstance(text, str):
        raise DocumentError(source, "record needs a string 'text' field")
    record_metadata = item.get("metadata", {})
    if not isinstance(record_metadata, dict):
        raise DocumentError(source, "record 'metadata' must be a JSON object")
    raw_id = item.get("id")
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int)):
        raise DocumentError(source, "record 'id' must be a string or an integer")
    if raw_id is not None and not str(raw_id):
        raise DocumentError(source, "record 'id' is empty")
    text = text.replace("\r\n", "\n")
    doc_id = str(raw_id) if raw_id is not None else content_id(text.encode("utf-8"))
    extra = {key: value for key, value in item.items() if key not in _RECORD_KEYS}
    metadata = {**base, **extra, **record_metadata}
    return Document(doc_id, _require_text(text, source), metadata, source)
