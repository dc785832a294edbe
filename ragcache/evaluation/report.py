"""Eval outputs: the Markdown table, the JSON payload and the quality-vs-TTFT Pareto plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ragcache.evaluation.hf_baseline import BASELINE_LABEL

COLUMNS = (
    ("recompute_fraction", "recomputed"),
    ("nll", "NLL"),
    ("gap_closed", "gap closed"),
    ("gap_closed_ci", "gap closed, 95% CI"),
    ("agree16", "16-tok agree"),
    ("first_token", "first tok"),
    ("f1", "F1"),
    ("em", "EM"),
    ("contains", "contains"),
    ("ttft_s", "TTFT s (p50)"),
    ("e2e_s", "e2e s (p50)"),
    ("speedup", "TTFT speed-up"),
    ("e2e_speedup", "e2e speed-up"),
    ("read_s", "tier read s (p50)"),
    ("read_wait_s", "read waited s (p50)"),
    ("bound_speedup", "compute bound"),
    ("bound_share", "share of bound"),
)


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def _interval(row: dict[str, float]) -> str:
    low, high = row.get("gap_closed_lo"), row.get("gap_closed_hi")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "-"
    return f"{low:.2f} to {high:.2f}"


def format_table(summary: dict[str, dict[str, float]]) -> str:
    header = "| setting | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(COLUMNS)]
    for label, row in summary.items():
        cells = [
            _interval(row) if key == "gap_closed_ci" else _cell(row.get(key)) for key, _ in COLUMNS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_groups(groups: dict[str, dict[str, dict[str, float]]], metric: str) -> str:
    """One row per setting, one column per group (e.g. needle kind@depth)."""
    names = list(groups)
    settings = list(dict.fromkeys(s for summary in groups.values() for s in summary))
    lines = [
        f"| setting | {' | '.join(names)} |",
        "|---|" + "---:|" * len(names),
    ]
    for setting in settings:
        cells = [_cell(groups[g].get(setting, {}).get(metric)) for g in names]
        lines.append(f"| {setting} | {' | '.join(cells)} |")
    return "\n".join(lines)


def write_markdown(path: Path, title: str, command: str, sections: list[tuple[str, str]]) -> None:
    body = [f"# {title}", "", "Command:", "", f"    {command}", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text, ""]
    path.write_text("\n".join(body))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, allow_nan=True))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both lower x and higher y."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and oy >= y) and (ox < x or oy > y)
            for j, (ox, oy) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def label_offsets(
    points: list[tuple[float, float]], near_x: float = 0.3, near_y: float = 0.05
) -> list[float]:
    """Vertical label offsets (points) so labels of settings that sit close on the plot
    (within ``near_x`` decades of TTFT and ``near_y`` of the quality range) stack instead
    of overlapping: each takes the first free slot of 9 points below the ones placed."""
    if not points:
        return []
    ys = [y for _, y in points]
    span = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, float]] = []
    offsets = []
    for x, y in points:
        log_x = math.log10(x) if x > 0 else 0.0
        taken = {
            offset
            for px, py, offset in placed
            if abs(px - log_x) < near_x and abs(py - y) < near_y * span
        }
        offset = 4.0
        while offset in taken:
            offset -= 9.0
        placed.append((log_x, y, offset))
        offsets.append(offset)
    return offsets


def pareto_plot(
    path: Path, summary: dict[str, dict[str, float]], title: str, metrics: tuple[str, ...]
) -> bool:
    """Quality vs TTFT, one point per setting, one panel per quality metric.

    TTFT is relative to full prefill's (the inverse of the paired speed-up) when every
    setting has one, so settings added by a resumed run under other machine load sit
    where their paired ratio puts them; otherwise it is the median in seconds.
    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return False
    labels = [k for k, row in summary.items() if not math.isnan(row.get("ttft_s", math.nan))]
    relative = all(summary[k].get("speedup", 0) > 0 for k in labels)

    def ttft(row: dict[str, float]) -> float:
        return 1.0 / row["speedup"] if relative else row["ttft_s"]

    figure, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        shown = [k for k in labels if not math.isnan(summary[k].get(metric, math.nan))]
        points = [(ttft(summary[k]), summary[k][metric]) for k in shown]
        front = pareto_front(points)
        axis.step(
            [points[i][0] for i in front],
            [points[i][1] for i in front],
            where="post",
            color="0.6",
            linestyle="--",
            zorder=1,
            label="Pareto front",
        )
        offsets = label_offsets(points)
        for label, (x, y), offset in zip(shown, points, offsets, strict=True):
            marker, size, color = "o", 40, "tab:blue"
            if label == "full_prefill":
                marker, size, color = "*", 220, "tab:red"
            elif label == BASELINE_LABEL:
                marker, size, color = "s", 80, "tab:gray"
            axis.scatter(x, y, marker=marker, s=size, color=color, zorder=2)
            axis.annotate(
                label,
                (x, y),
                textcoords="offset points",
                xytext=(4, offset),
                fontsize=7,
                arrowprops={"arrowstyle": "-", "color": "0.7", "lw": 0.5} if offset != 4 else None,
            )
        axis.set_xscale("log")
        axis.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel(
            "TTFT / full prefill's, paired medians (log scale)"
            if relative
            else "TTFT, median over examples (s, log scale)"
        )
        axis.set_ylabel(metric)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
