"""The serving benchmark's load: MuSiQue loading, Zipf questions, Poisson arrivals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ragcache.bench.serve_workload import (
    MusiqueItem,
    build_workload,
    corpus_files,
    draw_questions,
    load_items,
    unit_arrivals,
    zipf_weights,
)

ITEMS = [MusiqueItem(f"question {i}?", (f"passage {i}a", f"passage {i}b")) for i in range(6)]


def test_zipf_weights_fall_with_rank_and_sum_to_one() -> None:
    weights = zipf_weights(5, 1.1)
    assert weights.sum() == pytest.approx(1.0)
    assert (np.diff(weights) < 0).all()
    assert weights[0] / weights[1] == pytest.approx(2**1.1)
    assert np.allclose(zipf_weights(4, 0.0), 0.25)


def test_question_draws_are_seeded_and_popular_first() -> None:
    draws = draw_questions(6, 2000, 1.1, seed=3)
    assert draws == draw_questions(6, 2000, 1.1, seed=3)
    assert draws != draw_questions(6, 2000, 1.1, seed=4)
    counts = np.bincount(draws, minlength=6)
    assert set(draws) <= set(range(6)) and counts[0] > counts[2] > counts[5]
    share = counts[0] / len(draws)
    assert share == pytest.approx(zipf_weights(6, 1.1)[0], abs=0.04)


def test_unit_arrivals_start_at_zero_with_mean_gap_one() -> None:
    times = unit_arrivals(4000, seed=0)
    assert times == unit_arrivals(4000, seed=0)
    gaps = np.diff(times)
    assert times[0] == 0.0 and len(times) == 4000 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1.0, rel=0.06)
    assert gaps.std() == pytest.approx(1.0, rel=0.08)  # exponential: std equals the mean


def test_workload_is_bounded_by_count_and_duration_and_replays_across_rates() -> None:
    slow = build_workload(ITEMS, rate=0.5, max_requests=50, duration_s=20, exponent=1.1, seed=0)
    fast = build_workload(ITEMS, rate=2.0, max_requests=50, duration_s=20, exponent=1.1, seed=0)
    assert all(t < 20 for t in slow.arrivals) and len(slow) < len(fast) <= 50
    assert fast.question_ids[: len(slow)] == slow.question_ids
    assert [t / 4 for t in slow.arrivals] == pytest.approx(list(fast.arrivals[: len(slow)]))
    assert slow.questions == tuple(ITEMS[i].question for i in slow.question_ids)
    capped = build_workload(ITEMS, rate=100, max_requests=7, duration_s=20, exponent=1.1, seed=0)
    assert len(capped) == 7
    with pytest.raises(ValueError, match="rate"):
        build_workload(ITEMS, rate=0, max_requests=5, duration_s=10, exponent=1.1, seed=0)


def test_corpus_files_name_each_distinct_passage_once() -> None:
    items = [*ITEMS[:2], MusiqueItem("again?", ("passage 0a", "new passage"))]
    files = corpus_files(items)
    assert [name for name, _ in files] == [
        "q000-p00.txt", "q000-p01.txt", "q001-p00.txt", "q001-p01.txt", "q002-p01.txt",
    ]  # fmt: skip
    assert files[-1][1] == b"new passage"


def test_load_items_reads_musique_and_names_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "musique.json"
    records = [{"question": " Who? ", "ctxs": [{"title": "", "text": "A text."}], "answers": []}]
    path.write_text(json.dumps(records * 3))
    items = load_items(path, 2)
    assert items == [MusiqueItem("Who?", ("A text.",))] * 2
    with pytest.raises(ValueError, match="holds 3 items"):
        load_items(path, 4)
    with pytest.raises(ValueError, match="does not exist"):
        load_items(tmp_path / "missing.json", 1)
    path.write_text(json.dumps([{"question": "Who?"}]))
    with pytest.raises(ValueError, match="lacks 'question' or 'ctxs'"):
        load_items(path, 1)
