"""Tables and reports of the serving benchmark: the table and the Markdown page."""

from __future__ import annotations

from typing import Any

from ragcache.bench.report import page_head


def table_lines(report: dict[str, Any]) -> list[str]:
    ours, baseline = report["engine"], report["transformers"]
    theirs = baseline["measured"]
    off = report.get("engine_speculation_off")
    note = " (extrapolated)" if baseline["extrapolated"] else ""
    off_head = " ragcache engine, speculation off |" if off else ""

    def row(label: str, mine: str, plain: str, other: str) -> str:
        return f"| {label} | {mine} |" + (f" {plain} |" if off else "") + f" {other} |"

    def rate(metrics: dict[str, Any], key: str, digits: int) -> str:
        return f"{metrics[key]:.{digits}f}"

    lines = [
        f"| metric | ragcache engine |{off_head} transformers, sequential{note} |",
        "|---|---:|" + ("---:|" if off else "") + "---:|",
        row(
            "requests",
            str(ours["completed"]),
            str(off["completed"]) if off else "",
            f"{baseline['measured_requests']} timed",
        ),
    ]
    for label, key, digits in (
        ("request throughput (req/s)", "request_throughput", 3),
        ("output token throughput (tok/s)", "output_token_throughput", 1),
        ("total token throughput (tok/s)", "total_token_throughput", 1),
    ):
        lines.append(
            row(
                label,
                rate(ours, key, digits),
                rate(off, key, digits) if off else "",
                rate(baseline, key, digits),
            )
        )
    for name in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean_ms", "median_ms", "p99_ms"):
            lines.append(
                row(
                    f"{name.upper()} {stat.removesuffix('_ms')} (ms)",
                    f"{ours[name][stat]:.1f}",
                    f"{off[name][stat]:.1f}" if off else "",
                    f"{theirs[name][stat]:.1f}",
                )
            )
    spec = ours.get("speculation")
    agreement = report.get("greedy_agreement")
    if agreement:
        lines.append(
            f"\ngreedy outputs identical to transformers' on {agreement['identical_requests']} "
            f"of the {agreement['compared_requests']} requests timed on both sides"
        )
    lines.append(
        f"\ntotal token throughput ratio: {report['total_token_throughput_ratio']:.2f}x "
        f"(target >= {report['target_ratio']:.0f}x); engine latencies count from t=0 with "
        "every request queued at once, transformers latencies from each request's own start"
    )
    if spec:
        lines.append(
            f"\nspeculation ({spec['method']}, up to {spec['num_speculative_tokens']} drafts): "
            f"acceptance {spec['acceptance_rate']:.2f}, {spec['decode_tokens_per_step']:.2f} "
            "tokens per decode step"
        )
    if off:
        lines.append(
            f"\nwith speculation off: {report['speculation_off_ratio']:.2f}x; "
            f"{report['speculation_on_off_identical_requests']} of {ours['completed']} outputs "
            "identical with and without speculation"
        )
    return lines + llama_server_lines(report)


def llama_server_lines(report: dict[str, Any]) -> list[str]:
    """The engine against llama-server on the same workload, file and threads."""
    llama = report.get("llama_server") or {}
    if "metrics" not in llama:
        return [f"\nllama-server: {llama['skipped']}"] if "skipped" in llama else []
    ours, theirs = report["engine"], llama["metrics"]
    lines = [
        "",
        f"| metric | ragcache engine | llama-server, {llama['slots']} slots |",
        "|---|---:|---:|",
    ]
    for label, key in (
        ("request throughput (req/s)", "request_throughput"),
        ("output token throughput (tok/s)", "output_token_throughput"),
        ("total token throughput (tok/s)", "total_token_throughput"),
    ):
        lines.append(f"| {label} | {ours[key]:.2f} | {theirs[key]:.2f} |")
    for name in ("ttft", "tpot", "e2e"):
        lines.append(
            f"| {name.upper()} median (ms) | {ours[name]['median_ms']:.1f} | "
            f"{theirs[name]['median_ms']:.1f} |"
        )
    agreement = llama["greedy_agreement"]
    lines.append(
        f"\ntotal token throughput against llama-server: "
        f"{llama['total_token_throughput_ratio']:.2f}x (target >= {llama['target_ratio']:.1f}x); "
        f"greedy outputs identical on {agreement['identical_requests']} of "
        f"{agreement['compared_requests']} requests (mean identical leading tokens "
        f"{agreement['mean_identical_leading_tokens']:.1f})"
    )
    return lines


def markdown_page(report: dict[str, Any]) -> list[str]:
    settings = report["settings"]
    markdown = [
        *page_head("Serving benchmark: continuous batching against transformers", report),
        f"{settings['num_requests']} requests submitted at t=0, prompts of "
        f"{settings['prompt_tokens_range'][0]}-{settings['prompt_tokens_range'][1]} MuSiQue "
        f"tokens, outputs of {settings['output_tokens_range'][0]}-"
        f"{settings['output_tokens_range'][1]} tokens, {settings['model']} in "
        f"{settings['dtype']}, torch threads: {report['machine']['threads']}, KV block "
        f"placement: {settings['block_placement']}.",
        "",
        *table_lines(report),
        "",
    ]
    if report["transformers"]["extrapolated"]:
        markdown += [f"Baseline: {report['transformers']['extrapolation']}.", ""]
    return markdown
