"""The workload's per-setting figures split by kind of request."""

from __future__ import annotations

from typing import Any

from ragcache.bench.workload_summary import kind_table, summarize


def record(repeat: bool, reordered: bool, exact: int, ttft: float) -> dict[str, Any]:
    return {
        "repeat": repeat,
        "reordered": reordered,
        "context_tokens": 100,
        "exact_tokens": exact,
        "recomputed_tokens": 100 - exact,
        "encoded_tokens": 0,
        "ttft_s": ttft,
        "prefill_ttft_s": 4.0,
        "answer_equal": True,
        "agree16": 1.0,
        "nll": 0.5,
        "reuse_nll": 0.6,
        "prefill_nll": 0.5,
    }


def test_each_kind_of_request_gets_its_own_exact_share_and_p50() -> None:
    records = [
        record(False, False, 0, 4.0),
        record(False, False, 0, 5.0),
        record(True, False, 100, 0.5),
        record(True, False, 50, 2.0),
        record(True, False, 100, 0.4),
        record(True, True, 20, 3.0),
    ]
    kinds = summarize(records)["by_kind"]
    assert list(kinds) == ["first ask", "same-order repeat", "reordered repeat"]
    first, same, reordered = kinds.values()
    assert (first["requests"], first["exact_share"], first["p50_ttft_s"]) == (2, 0.0, 4.5)
    assert same["requests"] == 3 and same["whole_context_exact"] == 2
    assert abs(same["exact_share"] - 250 / 300) < 1e-12
    assert same["p50_ttft_s"] == 0.5 and same["ttft_speedup"] == 8.0
    assert reordered["exact_share"] == 0.2
    lines = kind_table({"tree": summarize(records)})
    assert lines[2] == "| tree | 2 | first ask | 0.0% | 0 | 4500 ms | 0.9x |"
    assert len(lines) == 5
