"""Per-setting figures of the workload benchmark from its per-request records."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from ragcache.evaluation.metrics import gap_closed, gap_closed_interval


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


REQUEST_KINDS = ("first ask", "same-order repeat", "reordered repeat")


def request_kind(record: dict[str, Any]) -> str:
    if not record["repeat"]:
        return "first ask"
    return "reordered repeat" if record["reordered"] else "same-order repeat"


def by_kind(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Exact share and p50 TTFT of each kind of request: a p50 over the whole stream
    lands on whichever kind holds its middle request."""
    kinds: dict[str, dict[str, Any]] = {}
    for kind in REQUEST_KINDS:
        chosen = [r for r in records if request_kind(r) == kind]
        if not chosen:
            continue
        context = sum(r["context_tokens"] for r in chosen) or 1
        ttft = median([r["ttft_s"] for r in chosen])
        prefill_ttft = median([r["prefill_ttft_s"] for r in chosen])
        kinds[kind] = {
            "requests": len(chosen),
            "exact_share": sum(_exact(r) for r in chosen) / context,
            "whole_context_exact": sum(_exact(r) == r["context_tokens"] for r in chosen),
            "p50_ttft_s": ttft,
            "ttft_speedup": prefill_ttft / ttft if ttft else float("nan"),
        }
    return kinds


def _exact(record: dict[str, Any]) -> int:
    # A token computed for this request is recomputed, never exact as well (records of
    # exact paths computed now carried both).
    return min(record["exact_tokens"], record["context_tokens"] - record["recomputed_tokens"])


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token shares, paired gap closed with its 95% interval, agreement and TTFT."""
    context = sum(r["context_tokens"] for r in records) or 1
    exact = sum(_exact(r) for r in records)
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
        "by_kind": by_kind(records),
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


def kind_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Each setting's requests split by kind: first asks, same-order and reordered repeats."""
    lines = [
        "| setting | requests | kind | exact | whole context exact | p50 TTFT | vs full prefill |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        for kind, k in s["by_kind"].items():
            lines.append(
                f"| {name} | {k['requests']} | {kind} | {k['exact_share']:.1%} "
                f"| {k['whole_context_exact']} | {k['p50_ttft_s'] * 1000:.0f} ms "
                f"| {k['ttft_speedup']:.1f}x |"
            )
    return lines
