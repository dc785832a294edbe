"""Summaries and tables of the noisy-neighbour benchmark: tenant B's latency and errors
per phase, tenant A's noise, and the verdict against the target."""

from __future__ import annotations

from typing import Any

from ragcache.bench.report import page_head
from ragcache.bench.serve_client import RequestSample
from ragcache.bench.serve_summary import percentile


def phase_summary(samples: list[RequestSample], wall_s: float) -> dict[str, Any]:
    """Tenant B's requests of one phase: count, errors, end-to-end and TTFT percentiles."""
    e2e = [s.e2e for s in samples if s.e2e is not None]
    ttft = [s.ttft for s in samples if s.ttft is not None]
    return {
        "sent": len(samples),
        "completed": len(e2e),
        "errors": sum(1 for s in samples if not s.ok),
        "error_messages": sorted({s.error for s in samples if s.error}),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p95_s": percentile(e2e, 95),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "wall_s": wall_s,
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_lines(report: dict[str, Any]) -> list[str]:
    phases, verdict, noise = report["phases"], report["verdict"], report["tenant_a"]
    lines = [
        "| tenant B phase | sent | errors | e2e p50 (s) | e2e p95 (s) | TTFT p50 (s) "
        "| TTFT p95 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("quiet", "noisy"):
        p = phases[name]
        lines.append(
            f"| {name} | {p['sent']} | {p['errors']} | {_seconds(p['e2e_p50_s'])} "
            f"| {_seconds(p['e2e_p95_s'])} | {_seconds(p['ttft_p50_s'])} "
            f"| {_seconds(p['ttft_p95_s'])} |"
        )
    statuses = ", ".join(f"{k}: {v}" for k, v in noise["bad_request_statuses"].items())
    lines += [
        "",
        f"noisy/quiet e2e p50: {_ratio(verdict['e2e_p50_ratio'])}, "
        f"p95: {_ratio(verdict['e2e_p95_ratio'])} (target p50 <= "
        f"{verdict['target_p50_ratio']:g}x, 0 errors for B): "
        f"{'met' if verdict['meets_target'] else 'NOT met'}",
        f"tenant A: ingest of {noise['ingest_files']} files ({noise['ingest_bytes']} bytes), "
        f"job {noise['ingest_status_at_phase_end']} at phase end"
        + (f" after {noise['ingest_seconds']:.1f} s" if noise["ingest_seconds"] else "")
        + f"; {noise['bad_requests_sent']} bad requests ({statuses}), "
        f"{verdict['bad_requests_not_4xx']} not refused with a 4xx",
    ]
    return lines


def markdown_page(report: dict[str, Any]) -> list[str]:
    return [*page_head("Noisy neighbour: tenant B alone and beside tenant A", report),
            *table_lines(report)]  # fmt: skip
