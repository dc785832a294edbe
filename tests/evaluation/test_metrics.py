"""Answer and fidelity metrics on hand-made cases."""

from __future__ import annotations

import math

import pytest

from ragcache.evaluation.fusion_eval import parse_settings
from ragcache.evaluation.metrics import (
    answer_contains,
    exact_match,
    f1_score,
    gap_closed,
    mean_nll,
    normalize_answer,
    prefix_agreement,
)
from ragcache.evaluation.outcomes import Outcome, summarize


def test_normalisation_drops_case_punctuation_articles_and_spaces() -> None:
    assert normalize_answer("  The  Eiffel-Tower, in Paris! ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_exact_match_takes_the_best_gold() -> None:
    assert exact_match("the Beatles", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_f1_counts_token_overlap() -> None:
    assert f1_score("John Smith", ["John Smith"]) == 1.0
    assert f1_score("Smith", ["John Smith"]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert f1_score("nothing here", ["John Smith"]) == 0.0
    assert f1_score("", [""]) == 1.0
    assert f1_score("x", []) == 0.0


def test_prefix_agreement_compares_the_leading_tokens() -> None:
    assert prefix_agreement([1, 2, 3, 9], [1, 2, 3, 4], 3) == 1.0
    assert prefix_agreement([1, 2, 3, 9], [1, 2, 3, 4], 4) == 0.0
    assert prefix_agreement([1, 2], [1, 2], 16) == 1.0


def test_nll_and_gap_closed() -> None:
    assert mean_nll([-1.0, -3.0]) == 2.0
    assert gap_closed(method_nll=1.5, reuse_nll=2.0, prefill_nll=1.0) == 0.5
    assert gap_closed(method_nll=1.0, reuse_nll=2.0, prefill_nll=1.0) == 1.0
    assert math.isnan(gap_closed(1.0, 1.0, 1.0))


def outcome(example: int, setting: str, nll: float, ids: list[int], ttft: float) -> Outcome:
    return Outcome(example, setting, ttft, 0.0, 0.5, ids, "", nll, 1.0, 1.0, 0.0, 0.0)


def test_summary_reports_gap_speedup_and_codec_agreement() -> None:
    rows = [
        outcome(0, "full_prefill", 1.0, [5, 6], 10.0),
        outcome(0, "full_reuse", 3.0, [5, 7], 1.0),
        outcome(0, "cacheblend-0.15", 2.0, [5, 6], 4.0),
        outcome(0, "full_reuse-int8", 3.1, [5, 8], 1.0),
    ]
    summary = summarize(rows)
    assert summary["cacheblend-0.15"]["gap_closed"] == pytest.approx(0.5)
    assert summary["full_reuse"]["speedup"] == pytest.approx(10.0)
    assert summary["full_reuse-int8"]["first_token_vs_raw"] == 1.0
    assert summary["full_reuse-int8"]["agree16_vs_raw"] == 0.0


def test_settings_parse_parameters_and_codec() -> None:
    blend, reuse = parse_settings(["cacheblend:ratio=0.3,check_layer=2", "full_reuse:codec=int8"])
    assert (blend.method, blend.params, blend.label) == (
        "cacheblend",
        {"ratio": 0.3, "check_layer": 2.0},
        "cacheblend-0.3-2",
    )
    assert (reuse.codec, reuse.label) == ("int8", "full_reuse-int8")


def test_answer_contains_is_word_aligned_after_normalisation() -> None:
    assert answer_contains("The code is 4721.", ["4721"]) == 1.0
    assert answer_contains("It was the Beatles, surely", ["beatles"]) == 1.0
    assert answer_contains("47210", ["4721"]) == 0.0
    assert answer_contains("anything", [""]) == 0.0


def test_summary_skips_missing_values_and_takes_medians_of_latency() -> None:
    rows = [
        outcome(0, "full_prefill", 1.0, [5], 10.0),
        outcome(1, "full_prefill", 1.0, [5], 30.0),
        outcome(2, "full_prefill", 1.0, [5], 20.0),
    ]
    summary = summarize(rows)["full_prefill"]
    assert summary["ttft_s"] == 20.0
    assert summary["ttft_mean_s"] == 20.0
    assert math.isnan(summary["contains"])  # old rows carry no containment figure
    assert summary["examples"] == 3


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("cachefold", "unknown method"),
        ("cacheblend:ratio", "is not key=value"),
        ("cacheblend:ratio=high", "is not a number"),
        ("full_reuse:codec=zip", "codec 'zip'"),
    ],
)
def test_bad_settings_name_the_problem(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_settings([spec])


def test_speedup_pairs_each_row_with_the_full_prefill_of_its_own_call() -> None:
    first_run = [
        outcome(0, "full_prefill", 1.0, [5], 10.0),
        outcome(0, "full_reuse", 3.0, [5], 1.0),
    ]
    # Added by a resumed run whose full prefill took 20 s on the same prompt.
    resumed = outcome(0, "legolink-32", 2.0, [5], 4.0)
    resumed.ref_ttft_s = 20.0
    resumed.e2e_s, resumed.ref_e2e_s = 8.0, 24.0
    summary = summarize([*first_run, resumed])
    assert summary["full_reuse"]["speedup"] == pytest.approx(10.0)  # falls back to row 0
    assert summary["legolink-32"]["speedup"] == pytest.approx(5.0)  # 20 / 4, not 10 / 4
    assert summary["legolink-32"]["e2e_speedup"] == pytest.approx(3.0)
    assert "e2e_speedup" not in summary["full_reuse"]  # no e2e time recorded


def test_gap_interval_brackets_the_point_estimate_and_collapses_when_examples_agree() -> None:
    from ragcache.evaluation.metrics import gap_closed_interval

    method, reuse, prefill = [0.5, 0.7, 0.2, 0.9], [1.0, 1.0, 0.4, 1.2], [0.0, 0.4, 0.0, 0.6]
    low, high = gap_closed_interval(method, reuse, prefill)
    point = gap_closed(sum(method) / 4, sum(reuse) / 4, sum(prefill) / 4)
    assert low <= point <= high
    assert low < high
    same = gap_closed_interval([0.5] * 5, [1.0] * 5, [0.0] * 5)
    assert same == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="equally many"):
        gap_closed_interval([0.5], [1.0, 1.0], [0.0])
