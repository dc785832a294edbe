"""Report pieces: the Pareto front, the tables and the plot file."""

from __future__ import annotations

import math
from pathlib import Path

from ragcache.evaluation.report import (
    format_groups,
    format_table,
    label_offsets,
    pareto_front,
    pareto_plot,
)


def test_pareto_front_keeps_points_nothing_beats_on_both_axes() -> None:
    points = [(10.0, 1.0), (1.0, 0.2), (2.0, 0.9), (3.0, 0.5), (2.0, 0.9), (0.5, 0.1)]
    # (3.0, 0.5) loses to (2.0, 0.9); equal points do not knock each other out.
    assert pareto_front(points) == [5, 1, 2, 4, 0]


def test_table_prints_dashes_for_missing_figures() -> None:
    table = format_table({"full_reuse": {"nll": 0.5, "gap_closed": math.nan, "ttft_s": 1.25}})
    header, rule, row = table.splitlines()
    assert header.startswith("| setting | recomputed | NLL | gap closed")
    assert row.startswith("| full_reuse | - | 0.500 | - |")
    assert "1.250" in row
    assert rule.count("---") == header.count("|") - 1


def test_group_table_has_a_column_per_group() -> None:
    groups = {
        "single@0": {"full_reuse": {"contains": 1.0}},
        "two_chunk@1": {"full_reuse": {"contains": 0.5}, "cacheblend-0.15": {"contains": 1.0}},
    }
    lines = format_groups(groups, "contains").splitlines()
    assert lines[0] == "| setting | single@0 | two_chunk@1 |"
    assert lines[2] == "| full_reuse | 1.000 | 0.500 |"
    assert lines[3] == "| cacheblend-0.15 | - | 1.000 |"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    summary = {
        "full_prefill": {"ttft_s": 4.0, "agree16": 1.0, "f1": 0.3},
        "full_reuse": {"ttft_s": 0.4, "agree16": 0.2, "f1": 0.2},
        "transformers": {"ttft_s": 5.0, "agree16": 1.0, "f1": math.nan},
    }
    path = tmp_path / "plot.png"
    assert pareto_plot(path, summary, "test", ("agree16", "f1"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labels_of_close_points_stack_and_far_ones_keep_their_place() -> None:
    points = [(0.1, 0.50), (0.105, 0.505), (0.11, 0.50), (1.0, 0.50), (0.1, 0.95)]
    offsets = label_offsets(points)
    assert offsets[:3] == [4.0, -5.0, -14.0]
    assert offsets[3] == 4.0  # a decade away
    assert offsets[4] == 4.0  # far up the quality axis
    assert label_offsets([]) == []
