"""The needle suite generator: seeded, planted where it says, one or two chunks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.evaluation.needle import NeedleOptions, needle_suite


@pytest.fixture(scope="module")
def items(shared_data: Path) -> list[dict]:
    return json.loads((shared_data / "musique_dev.json").read_text())[:6]


def test_same_seed_same_suite_other_seed_other_facts(items: list[dict]) -> None:
    options = NeedleOptions(examples=6, passages=3, seed=7)
    assert needle_suite(items, options) == needle_suite(items, options)
    other = needle_suite(items, NeedleOptions(examples=6, passages=3, seed=8))
    assert [e["answers"] for e in other] != [e["answers"] for e in needle_suite(items, options)]


def test_facts_sit_in_the_chunks_the_record_names(items: list[dict]) -> None:
    suite = needle_suite(items, NeedleOptions(examples=12, passages=4, depths=(0.0, 1.0)))
    kinds = {e["needle"]["kind"] for e in suite}
    assert kinds == {"single", "two_chunk"}
    for example in suite:
        record = example["needle"]
        target = record["chunks"][-1]
        assert target == (0 if record["depth"] == 0.0 else 3)
        answer = example["answers"][0]
        holders = [i for i, ctx in enumerate(example["ctxs"]) if answer in ctx["text"]]
        assert holders == [target]
        if record["kind"] == "two_chunk":
            owner = example["question"].split("owned by ")[1].split(" kept")[0]
            first = record["chunks"][0]
            assert first != target
            assert owner in example["ctxs"][first]["text"]
            assert owner not in example["ctxs"][target]["text"]
        assert len(example["ctxs"]) == 4


def test_source_passages_are_left_untouched(items: list[dict]) -> None:
    before = json.dumps(items)
    needle_suite(items, NeedleOptions(examples=4, passages=3))
    assert json.dumps(items) == before


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"examples": 0}, "examples must be at least 1"),
        ({"passages": 1}, "passages must be at least 2"),
        ({"depths": (1.5,)}, "depths must be fractions"),
        ({"two_chunk_share": 2.0}, "two_chunk_share"),
    ],
)
def test_bad_options_are_refused(options: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        NeedleOptions(**options)


def test_too_few_passages_in_the_data_is_an_error(items: list[dict]) -> None:
    with pytest.raises(ValueError, match="no example has 11 passages"):
        needle_suite(items, NeedleOptions(passages=11))
