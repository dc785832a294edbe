"""Outcomes of the fusion evaluation: one record per example and setting, stored as
JSON lines, and their summary per setting (quality means, latency medians, speed-ups
and gap closed against full prefill, with intervals)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from ragcache.chunkstore.codecs import CODECS
from ragcache.evaluation.metrics import gap_closed, gap_closed_interval, prefix_agreement


@dataclass(slots=True)
class Outcome:
    example: int
    setting: str
    ttft_s: float
    prepare_s: float
    recompute_fraction: float
    answer_ids: list[int]
    answer: str
    nll: float
    agree16: float
    first_token: float
    f1: float
    em: float
    contains: float = float("nan")
    e2e_s: float = float("nan")
    recomputed_tokens: int = 0
    prompt_tokens: int = 0
    group: str = ""
    # Full prefill of the same prompt, timed in the same evaluation call: the paired
    # baseline of the speed-ups, so a resumed run never compares across runs.
    ref_ttft_s: float = float("nan")
    ref_e2e_s: float = float("nan")
    # Inside ttft_s: reading every chunk from its tier (lookup, read, checksum, decode,
    # move to the engine); and what the setting computed besides its recomputed tokens.
    read_s: float = 0.0
    read_wait_s: float = 0.0  # the part of read_s fusion waited for (not hidden by compute)
    selection_fraction: float = 0.0
    query_tokens: int = 0


def bound_speedup(outcome: Outcome) -> float:
    """The setting's compute bound: full prefill's token-layers over the ones it must
    compute, with no (token, layer) twice. Its recomputed tokens and the question run
    through every layer; the choosing passes cover the rest of the prompt."""
    if outcome.prompt_tokens <= 0:
        return float("nan")
    through = min(1.0, (outcome.recomputed_tokens + outcome.query_tokens) / outcome.prompt_tokens)
    fraction = through + outcome.selection_fraction * (1.0 - through)
    return 1.0 / fraction if fraction > 0 else float("nan")


def summarize(outcomes: list[Outcome]) -> dict[str, dict[str, float]]:
    """Per setting: mean quality, median latencies, and ratios against full prefill."""
    by_setting: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_setting.setdefault(outcome.setting, []).append(outcome)
    summary = {label: _aggregate(rows) for label, rows in by_setting.items()}
    _codec_agreement(by_setting, summary)
    full = summary.get("full_prefill")
    reuse = summary.get("full_reuse")
    full_rows = {r.example: r for r in by_setting.get("full_prefill", [])}
    reuse_rows = {r.example: r for r in by_setting.get("full_reuse", [])}
    for label, row in summary.items():
        row.update(_speedups(by_setting[label], full_rows))
        if "speedup" in row and row.get("bound_speedup", 0) > 0:
            row["bound_share"] = row["speedup"] / row["bound_speedup"]
        if full and reuse:
            row["gap_closed"] = gap_closed(row["nll"], reuse["nll"], full["nll"])
            row.update(_gap_interval(by_setting[label], reuse_rows, full_rows))
    return summary


def _speedups(rows: list[Outcome], full_rows: dict[int, Outcome]) -> dict[str, float]:
    """Median full-prefill latency over median latency, on paired examples.

    Each row's baseline is the full prefill timed in the same evaluation call
    (``ref_*``); rows written before that field existed fall back to the full prefill
    row of their example, which was timed in the same call too.
    """
    out: dict[str, float] = {}
    for name, key in (("ttft_s", "speedup"), ("e2e_s", "e2e_speedup")):
        pairs = []
        for row in rows:
            ref = getattr(row, "ref_" + name)
            if math.isnan(ref) and row.example in full_rows:
                ref = getattr(full_rows[row.example], name)
            value = getattr(row, name)
            if not (math.isnan(ref) or math.isnan(value)):
                pairs.append((ref, value))
        if pairs:
            out[key] = statistics.median(r for r, _ in pairs) / statistics.median(
                v for _, v in pairs
            )
    return out


def _gap_interval(
    rows: list[Outcome], reuse_rows: dict[int, Outcome], full_rows: dict[int, Outcome]
) -> dict[str, float]:
    paired = [
        (r.nll, reuse_rows[r.example].nll, full_rows[r.example].nll)
        for r in rows
        if r.example in reuse_rows and r.example in full_rows
    ]
    if len(paired) < 2:
        return {}
    low, high = gap_closed_interval(*(list(column) for column in zip(*paired, strict=True)))
    return {"gap_closed_lo": low, "gap_closed_hi": high}


def summarize_groups(outcomes: list[Outcome]) -> dict[str, dict[str, dict[str, float]]]:
    """summarize() within each group (the needle suite's kind@depth)."""
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome.group:
            groups.setdefault(outcome.group, []).append(outcome)
    return {group: summarize(rows) for group, rows in sorted(groups.items())}


def _aggregate(rows: list[Outcome]) -> dict[str, float]:
    def mean(name: str) -> float:
        values = [getattr(r, name) for r in rows if not math.isnan(getattr(r, name))]
        return statistics.fmean(values) if values else float("nan")

    def median(name: str) -> float:
        values = [getattr(r, name) for r in rows if not math.isnan(getattr(r, name))]
        return statistics.median(values) if values else float("nan")

    return {
        "examples": len(rows),
        "nll": mean("nll"),
        "agree16": mean("agree16"),
        "first_token": mean("first_token"),
        "f1": mean("f1"),
        "em": mean("em"),
        "contains": mean("contains"),
        "ttft_s": median("ttft_s"),
        "ttft_mean_s": mean("ttft_s"),
        "e2e_s": median("e2e_s"),
        "recompute_fraction": mean("recompute_fraction"),
        "recomputed_tokens": mean("recomputed_tokens"),
        "read_s": median("read_s"),
        "read_wait_s": median("read_wait_s"),
        "bound_speedup": statistics.median(bound_speedup(r) for r in rows),
    }


def _codec_agreement(
    by_setting: dict[str, list[Outcome]], summary: dict[str, dict[str, float]]
) -> None:
    """For a '<setting>-<codec>' row, agreement with the same setting on raw KV."""
    for label, rows in by_setting.items():
        base_label, _, codec = label.rpartition("-")
        if codec not in CODECS or codec == "raw" or base_label not in by_setting:
            continue
        base = {r.example: r.answer_ids for r in by_setting[base_label]}
        pairs = [(r.answer_ids, base[r.example]) for r in rows if r.example in base]
        if pairs:
            summary[label]["first_token_vs_raw"] = statistics.fmean(
                prefix_agreement(a, b, 1) for a, b in pairs
            )
            summary[label]["agree16_vs_raw"] = statistics.fmean(
                prefix_agreement(a, b, 16) for a, b in pairs
            )


def load_outcomes(path: Path) -> list[Outcome]:
    if not path.is_file():
        return []
    return [Outcome(**json.loads(line)) for line in path.read_text().splitlines() if line]


def append_outcomes(path: Path, outcomes: list[Outcome]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        for outcome in outcomes:
            handle.write(json.dumps(asdict(outcome)) + "\n")
