from __future__ import annotations

import json

import pytest

from ragcache.retriever.documents import (
    ACCEPTED_TYPES,
    DocumentError,
    content_id,
    parse_bytes,
    parse_path,
)
from tests.retriever.conftest import SAMPLES


def minimal_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF whose content stream draws ``lines`` in Helvetica."""
    operations = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for line in lines:
        operations.append(f"({line}) Tj T*")
    operations.append("ET")
    stream = "\n".join(operations).encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_at,
    )
    return bytes(out)


def test_text_and_markdown_keep_their_text_and_get_a_content_id():
    data = b"Line one.\r\n\r\nLine two.\n"
    (txt,) = parse_bytes(data, "notes.txt")
    assert txt.text == "Line one.\n\nLine two.\n"
    assert txt.doc_id == content_id(data)
    assert txt.metadata == {"filename": "notes.txt", "type": "txt"}
    assert txt.source == "notes.txt"
    (md,) = parse_bytes(b"# Title\n\nSome *text*.", "readme.md", {"corpus": "demo"})
    assert md.text == "# Title\n\nSome *text*."
    assert md.metadata["corpus"] == "demo"


def test_content_id_is_stable_and_content_sensitive():
    assert content_id(b"abc") == content_id(b"abc")
    assert content_id(b"abc") != content_id(b"abd")
    assert len(content_id(b"abc")) == 32


def test_html_drops_markup_scripts_and_styles_and_keeps_paragraphs():
    html = b"""<html><head><title>A  page</title><style>p {color: red}</style></head>
    <body><h1>Heading</h1><p>First &amp; <b>bold</b>
    paragraph.</p><script>var x = "<p>hidden</p>";</script><div>Second<br>line</div>
    <ul><li>item one</li><li>item two</li></ul></body></html>"""
    (document,) = parse_bytes(html, "page.HTML")
    assert document.text == (
        "Heading\n\nFirst & bold paragraph.\n\nSecond\n\nline\n\nitem one\n\nitem two"
    )
    assert document.metadata["title"] == "A page"
    assert "hidden" not in document.text and "color" not in document.text


def test_pdf_text_is_extracted():
    pdf = minimal_pdf(["Four score and seven years ago", "our fathers brought forth"])
    (document,) = parse_bytes(pdf, "speech.pdf")
    assert "Four score and seven years ago" in document.text
    assert "our fathers brought forth" in document.text
    assert document.metadata["pages"] == 1


def test_jsonl_records_use_their_ids_and_metadata():
    lines = [
        {"id": "a", "text": "alpha text", "metadata": {"lang": "en"}},
        {"id": 7, "text": "beta text", "title": "Beta"},
        {"text": "gamma text"},
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode() + b"\n\n"
    documents = parse_bytes(data, "records.jsonl")
    assert [d.doc_id for d in documents] == ["a", "7", content_id(b"gamma text")]
    assert documents[0].metadata["lang"] == "en"
    assert documents[1].metadata["title"] == "Beta"
    assert documents[2].source == "records.jsonl:3"


def test_json_accepts_a_list_or_one_record():
    listed = parse_bytes(
        json.dumps([{"id": "x", "text": "one"}, {"text": "two"}]).encode(), "many.json"
    )
    assert [d.text for d in listed] == ["one", "two"]
    (single,) = parse_bytes(json.dumps({"id": "solo", "text": "only"}).encode(), "one.json")
    assert (single.doc_id, single.text) == ("solo", "only")


def test_parse_path_matches_parse_bytes_for_every_sample():
    paths = sorted(SAMPLES.iterdir())
    assert {path.suffix for path in paths} >= {".txt", ".md", ".html"}
    for path in paths:
        from_path = parse_path(path)
        from_bytes = parse_bytes(path.read_bytes(), str(path))
        assert from_path == from_bytes
        assert from_path[0].text.strip()


@pytest.mark.parametrize(
    ("data", "filename", "problem"),
    [
        (b"hello", "archive.zip", "unsupported file type '.zip'"),
        (b"hello", "README", "unsupported file type 'no file extension'"),
        (b"", "empty.txt", "contains no text"),
        (b" \n\t\n", "blank.md", "contains no text"),
        (b"<html><script>x()</script></html>", "script.html", "contains no text"),
        (b"caf\xe9", "latin1.txt", "is not UTF-8 text (byte 0xe9 at offset 3)"),
        (b'{"text": "a"', "broken.json", "malformed JSON"),
        (b'{"text": "a"}\n{oops}\n', "broken.jsonl", "malformed JSON"),
        (b"", "empty.jsonl", "contains no records"),
        (b"[]", "empty.json", "contains no records"),
        (b'{"id": "a"}', "notext.json", "record needs a string 'text' field"),
        (b'["just a string"]', "strings.json", "record must be a JSON object"),
        (b'{"text": "a", "metadata": [1]}', "meta.json", "'metadata' must be a JSON object"),
        (b'{"text": "a", "id": [1]}', "badid.json", "'id' must be a string or an integer"),
        (b'{"text": "   "}', "blank.json", "contains no text"),
        (b'{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}', "dup.jsonl", "duplicate"),
        (b"%PDF-1.4 not really a pdf", "fake.pdf", "is not a readable PDF"),
    ],
)
def test_bad_input_names_the_file_and_the_problem(data, filename, problem):
    with pytest.raises(DocumentError) as caught:
        parse_bytes(data, filename)
    message = str(caught.value)
    assert problem in message
    assert filename in message
    assert all(kind in message for kind in ACCEPTED_TYPES)
    assert isinstance(caught.value, ValueError)


def test_jsonl_errors_name_the_line():
    with pytest.raises(DocumentError, match=r"broken\.jsonl:2: malformed JSON"):
        parse_bytes(b'{"text": "a"}\n{oops}\n', "broken.jsonl")


def test_pdf_without_text_is_rejected():
    with pytest.raises(DocumentError, match="no extractable text"):
        parse_bytes(minimal_pdf([]), "scan.pdf")


def test_missing_path_is_a_document_error(tmp_path):
    with pytest.raises(DocumentError, match="cannot be read"):
        parse_path(tmp_path / "absent.txt")
