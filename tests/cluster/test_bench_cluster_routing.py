"""The routing benchmark end to end on the tiny model: two Ray Serve clusters (round robin,
cache-aware) over a real redis-server serve the same Zipf sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.bench.cluster_routing import zipf_sequence
from tests.service_helpers import SAMPLES, tiny_model_folder

pytest.importorskip("ray")
pytestmark = pytest.mark.cluster


def test_zipf_sequence_is_seeded_and_skewed() -> None:
    drawn = zipf_sequence(2000, 10, 1.1, seed=3)
    assert drawn == zipf_sequence(2000, 10, 1.1, seed=3)
    assert set(drawn) <= set(range(10))
    assert drawn.count(0) > drawn.count(9) * 3


def test_routing_benchmark_compares_both_routers(tmp_path: Path) -> None:
    from ragcache.bench.cluster import main

    texts = [p.read_text(encoding="utf-8")[:300] for p in sorted(SAMPLES.iterdir())]
    items = [
        {"question": f"Q{i}?", "answers": ["x"], "ctxs": [{"title": "t", "text": texts[i]}]}
        for i in range(2)
    ]
    data = tmp_path / "questions.json"
    data.write_text(json.dumps(items))
    out = tmp_path / "routing.json"
    main(
        [
            "routing",
            "--data", str(data),
            "--model", str(tiny_model_folder()),
            "--dtype", "float32",
            "--questions", "2",
            "--requests", "4",
            "--passages", "1",
            "--stats-wait-s", "0.3",
            "--skip", "throughput",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    for mode in ("round_robin", "cache_aware"):
        row = report["routing"][mode]
        assert len(row["ttft_s"]) == 4
        assert sum(row["chunk_sources"].values()) == 4
        assert 0.0 <= row["memory_share"] <= 1.0
    assert len(report["routing"]["round_robin"]["requests_per_replica"]) == 2
    low, high = report["p50_ratio_interval95"]
    assert low <= high
    assert "round robin / cache-aware p50" in out.with_suffix(".md").read_text()
