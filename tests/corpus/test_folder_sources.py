"""A folder ingest reads its files of accepted types and names every file it skips."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ragcache.corpus.ingest import read_sources
from ragcache.errors import InvalidInputError


def _write(folder: Path, name: str, text: str = "some text") -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_folder_ingest_names_each_skipped_file_and_why(tmp_path: Path, caplog):
    _write(tmp_path, "a.txt")
    _write(tmp_path, "nested/b.md")
    _write(tmp_path, "slides.pptx")
    _write(tmp_path, "Makefile")
    with caplog.at_level(logging.WARNING, logger="ragcache.corpus.ingest"):
        files = read_sources([tmp_path])
    assert sorted(Path(name).name for _, name in files) == ["a.txt", "b.md"]
    [record] = [r for r in caplog.records if "skipped" in r.getMessage()]
    message = record.getMessage()
    assert "skipped 2 file(s)" in message
    assert "slides.pptx (unsupported type .pptx)" in message
    assert "Makefile (no file extension)" in message


def test_folder_without_accepted_files_says_what_it_skipped(tmp_path: Path):
    _write(tmp_path, "data.bin")
    with pytest.raises(InvalidInputError) as caught:
        read_sources([tmp_path])
    assert "no files of accepted types" in caught.value.message
    assert "data.bin (unsupported type .bin)" in caught.value.message
    assert caught.value.param == "paths"


def test_folder_with_only_accepted_files_logs_nothing(tmp_path: Path, caplog):
    _write(tmp_path, "a.txt")
    with caplog.at_level(logging.WARNING, logger="ragcache.corpus.ingest"):
        read_sources([tmp_path])
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]
