"""Tables of the serving benchmark, printed and written as Markdown beside its JSON."""

from __future__ import annotations

from typing import Any

from ragcache.bench.report import page_head
from ragcache.bench.serve_summary import QUEUE_GROWTH_LIMIT, SUSTAIN_FRACTION


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _tiers(shares: dict[str, float]) -> str:
    return ", ".join(f"{tier} {share:.0%}" for tier, share in shares.items()) or "-"


def phase_table(rates: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| rate (req/s) | mode | sent | done | errors | req/s sent | req/s done | TTFT p50 (ms) "
        "| TTFT p99 (ms) | TPOT p50 (ms) | E2E p50 (ms) | chunks by tier | recompute "
        "| sustained |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for entry in rates:
        for mode in ("on", "off"):
            p = entry[mode]
            lines.append(
                f"| {entry['rate']:.3f} | {mode} | {p['sent']} | {p['completed']} "
                f"| {p['errors']} | {_num(p['offered_rate'])} | {_num(p['completed_rate'])} "
                f"| {_ms(p['ttft_p50_s'])} "
                f"| {_ms(p['ttft_p99_s'])} | {_ms(p['tpot_p50_s'])} | {_ms(p['e2e_p50_s'])} "
                f"| {_tiers(p['chunk_share_by_tier'])} | {_num(p['recompute_fraction'], 2)} "
                f"| {'yes' if p['sustained'] else 'no'} |"
            )
    return lines


def ratio_table(rates: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| rate (req/s) | TTFT p50 off/on | TTFT p99 off/on | E2E p50 off/on "
        "| off sustains | on sustains |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for entry in rates:
        lines.append(
            f"| {entry['rate']:.3f} | {_times(entry['ttft_p50_ratio'])} "
            f"| {_times(entry['ttft_p99_ratio'])} | {_times(entry['e2e_p50_ratio'])} "
            f"| {'yes' if entry['off']['sustained'] else 'no'} "
            f"| {'yes' if entry['on']['sustained'] else 'no'} |"
        )
    return lines


def verdict_line(report: dict[str, Any]) -> str:
    v = report["verdict"]
    if v["rate"] is None:
        return (
            "Caching off sustained none of the rates run, so the target (p50 TTFT at least "
            f"{v['target_ratio']:g}x lower at the highest rate caching off sustains) was not "
            "evaluated; run lower --rates."
        )
    outcome = "met" if v["meets_target"] else "not met"
    return (
        f"Highest rate caching off sustains: {v['rate']:.3f} req/s. There, p50 TTFT is "
        f"{_times(v['ttft_p50_ratio'])} lower with chunk caching on, with {v['on_errors']} "
        f"errors: target (>= {v['target_ratio']:g}x, zero errors) {outcome}."
    )


def ratio_range_line(rates: list[dict[str, Any]]) -> str:
    ratios = [entry["ttft_p50_ratio"] for entry in rates if entry["ttft_p50_ratio"] is not None]
    if not ratios:
        return "No rate gave a p50 TTFT in both modes."
    if len(ratios) == 1:
        return f"p50 TTFT is {_times(ratios[0])} lower with chunk caching on."
    return (
        f"Across the {len(rates)} rates run, p50 TTFT is {_times(min(ratios))} to "
        f"{_times(max(ratios))} lower with chunk caching on."
    )


def table_lines(report: dict[str, Any]) -> list[str]:
    return [
        *phase_table(report["rates"]),
        "",
        *ratio_table(report["rates"]),
        "",
        verdict_line(report),
        ratio_range_line(report["rates"]),
    ]


def setup_lines(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    corpus = report["corpus"]
    server = report["server"]
    where = (
        f"a server this run started on loopback (`ragcache serve {' '.join(server['flags'])}`)"
        if server["started_here"]
        else f"the running server at {server['url']}"
    )
    lines = [
        f"Server: {where}, model {server['model']}. Corpus `{corpus['name']}`: the "
        f"{corpus['documents']} passages of the first {s['questions']} MuSiQue questions "
        f"({corpus['chunks']} chunks); "
        + (
            f"uploaded through the HTTP API, ingest job {corpus['ingest_s']:.1f} s."
            if corpus["uploaded"]
            else "already on the server."
        ),
        "",
        f"Load: per rate and mode, Poisson arrivals (seed {s['seed']}) for at most "
        f"{s['duration_s']:g} s and {s['max_requests']} requests; each request asks one of the "
        f"{s['questions']} questions drawn with Zipf popularity (exponent {s['zipf_exponent']:g}), "
        f"so the same retrieved chunks come back. Streamed `POST /v1/query`, k={s['k']}, "
        f"max_tokens={s['max_tokens']}, greedy. Every rate replays the same question sequence; "
        "both modes get the same arrival times and questions.",
        "",
        f"On: `method={s['method']}`, recompute_ratio {s['recompute_ratio']:g}; chunk KV comes "
        "from the cache tiers (computed and stored on a miss). Off: `method=full_prefill` on "
        "the same server: the whole prompt (system prompt, retrieved chunks, question) is "
        "prefilled from its tokens, no chunk KV is read or stored, and the service runs these "
        "requests outside the engine's prefix cache. Both modes keep the server's engine "
        "settings (continuous batching, chunked prefill); in on mode the engine prefix cache "
        "shares the system prompt only, since later tokens hold fused KV.",
        "",
        f"Server chunk-KV precompute: {server['kv_precompute']}. "
        + (
            f"Warm-up: each of the {s['questions']} questions was asked once in on mode "
            f"before timing ({report['warmup']['seconds']:.1f} s), so its chunks' KV is cached."
            if report["warmup"]["requests"]
            else "No warm-up: the first on-mode requests compute and store their chunks' KV."
        ),
        "",
        f"TTFT is measured by the client, from sending the request to the first answer-text "
        f"event; TPOT = (last token time - first token time) / (tokens - 1); E2E to the result "
        f"event. Req/s sent and done: requests per second over the span of send times and "
        f"answers per second over the span of finish times. Chunks by tier: share of "
        f"retrieved chunks whose KV came from each tier "
        f"(`computed`: computed for the request). Recompute: context tokens computed for the "
        f"request / context tokens. A rate is *sustained* when no request failed, answers "
        f"completed at >= {SUSTAIN_FRACTION:.0%} of the rate requests were sent at (both over "
        f"their spans), and the later half's median TTFT is at most "
        f"{QUEUE_GROWTH_LIMIT:g}x the earlier half's (no growing queue).",
    ]
    calibration = report.get("calibration")
    if calibration:
        lines += [
            "",
            f"Rates: {', '.join(f'{f:.2f}' for f in calibration['fractions'])} x the "
            f"single-request capacity with caching off (1 / median E2E of "
            f"{calibration['requests']} sequential full-prefill requests = "
            f"{calibration['capacity_rps']:.3f} req/s).",
        ]
    return lines


def markdown_page(report: dict[str, Any]) -> list[str]:
    markdown = [
        *page_head("Serving benchmark: chunk caching on and off under Poisson load", report),
        *setup_lines(report),
        "",
        *table_lines(report),
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, load "
        f"average {report['machine']['load_average_start']} at start and "
        f"{report['machine']['load_average_end']} at the end; whole run "
        f"{report['wall_s']:.0f} s.",
        "",
    ]
    return markdown
