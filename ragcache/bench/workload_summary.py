"""Per-setting figures of the workload benchmark from its per-request records."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ragcache.evaluation.metrics import gap_closed, gap_closed_interval


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token shares, paired gap closed with its 95% interval, agreement and TTFT."""
    context = sum(r["context_tokens"] for r in records) or 1
    # A token computed for this request is recomputed, never exact as well (records of
    # exact paths computed now carried both).
    exact = sum(
        min(r["exact_tokens"], r["context_tokens"] - r["recomputed_tokens"]) for r in records
    )
    recomputed = sum(r["recomputed_tokens"] for r in records)
    nll = [r["nll"] for r in records]
    reuse = [r["reuse_nll"] for r in records]
    prefill = [r["prefill_nll"] for r in records]
    closed = gap_closed(statistics.fmean(nll), statistics.fmean(reuse), statistics.fmean(prefill))
    low, high = gap_closed_interval(nll, reuse, prefill)
    same_order = [r for r in records if r["repeat"] and not r["reordered"]]
    ttft = median([r["ttft_s"] for r in records])
    prefill_ttft = median([r["prefill_ttft_s"] for r in records])
    return {
        "requests": len(records),
        "exact_share": exact / context,
        "repaired_share": (context - exact - recomputed) / context,
        "recomputed_share": recomputed / context,
        "recomputed_tokens": recomputed,
        "encoded_share": sum(r["encoded_tokens"] for r in records) / context,
        "gap_closed": closed,
        "gap_closed_95": [low, high],
        "agree16": statistics.fmean(r["agree16"] for r in records),
        "p50_ttft_s": ttft,
        "p50_prefill_ttft_s": prefill_ttft,
        "ttft_speedup": prefill_ttft / ttft if ttft else float("nan"),
        "same_order_repeats": len(same_order),
        "same_order_repeats_answer_equal": sum(r["answer_equal"] for r in same_order),
    }


def table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| setting | requests | exact | repaired | recomputed | chunks encoded "
        "| gap closed (95%) | agree16 | p50 TTFT | vs full prefill "
        "| same-order repeats = reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        low, high = s["gap_closed_95"]
        lines.append(
            f"| {name} | {s['requests']} | {s['exact_share']:.1%} | {s['repaired_share']:.1%} "
            f"| {s['recomputed_share']:.1%} | {s['encoded_share']:.1%} "
            f"| {s['gap_closed']:.0%} ({low:.0%} to {high:.0%}) | {s['agree16']:.2f} "
            f"| {s['p50_ttft_s'] * 1000:.0f} ms | {s['ttft_speedup']:.1f}x "
            f"| {s['same_order_repeats_answer_equal']} of {s['same_order_repeats']} |"
        )
    return lines
