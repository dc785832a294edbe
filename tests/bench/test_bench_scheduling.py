"""The scheduling benchmark runs end to end on the tiny model and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

from ragcache.bench.scheduling import main
from tests.bench.test_bench_serve import musique_file
from tests.service_helpers import tiny_model_folder


def test_benchmark_writes_both_comparisons(tmp_path: Path) -> None:
    out = tmp_path / "bench_scheduling.json"
    main(
        [
            "--model", str(tiny_model_folder()), "--data", str(musique_file(tmp_path)),
            "--questions", "2", "--warm", "2", "--cold", "1", "--k", "2", "--repeats", "1",
            "--max-tokens", "2", "--gap", "0.05", "--bounds", "10", "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    overlap, order = report["overlap"], report["order"]
    assert overlap["queries_per_mode"] == 2
    assert overlap["identical_answers"] == 2
    assert overlap["example_cache_state"]["computed_tokens"] > 0
    assert overlap["example_cache_state"]["tokens_by_tier"].get("disk", 0) > 0
    assert order["plan"] == ["cold", "warm", "warm"]
    assert order["queries_per_arm"] == 3
    assert set(order["summary"]) == {"fcfs", "cache_aware, bound 10 s"}
    markdown = out.with_suffix(".md").read_text()
    assert report["command"] in markdown and "| cache_aware, bound 10 s |" in markdown
