"""Evaluation data files: MuSiQue JSON and JSONL, with errors that name the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.evaluation.examples import ExampleFormatError, load_examples, passage_text

ITEM = {"question": "Who?", "answers": ["Ada"], "ctxs": [{"title": "T", "text": "Ada wrote."}]}


def test_json_list_and_jsonl_load_alike(tmp_path: Path) -> None:
    listed = tmp_path / "data.json"
    listed.write_text(json.dumps([ITEM, ITEM]))
    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(ITEM) + "\n\n" + json.dumps(ITEM) + "\n")
    assert load_examples(listed) == load_examples(lines) == [ITEM, ITEM]


def test_a_single_gold_string_becomes_a_list(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Who?", "answers": "Ada"}))
    assert load_examples(path, need_ctxs=False)[0]["answers"] == ["Ada"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"question": "x"}), "expected a JSON list"),
        (json.dumps([]), "no examples"),
        (json.dumps([{"answers": ["a"], "ctxs": [{"text": "t"}]}]), r"\[0\]: 'question'"),
        (json.dumps([{**ITEM, "answers": [3]}]), "'answers' must be a list of strings"),
        (json.dumps([{**ITEM, "ctxs": []}]), "'ctxs' must be a non-empty list"),
        (json.dumps([{**ITEM, "ctxs": [{"title": "x"}]}]), r"ctxs\[0\] needs a string 'text'"),
    ],
)
def test_malformed_files_fail_naming_the_field(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ExampleFormatError, match=problem):
        load_examples(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ExampleFormatError, match="no such file"):
        load_examples(tmp_path / "absent.json")


def test_passage_text_puts_the_title_first_when_there_is_one() -> None:
    assert passage_text({"title": "Ada", "text": "wrote."}) == "Ada\nwrote."
    assert passage_text({"title": " ", "text": "wrote."}) == "wrote."
    assert passage_text({"text": "wrote."}) == "wrote."
