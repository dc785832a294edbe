"""The cluster benchmark end to end on the tiny model and a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.bench.cluster import SOURCES, main
from tests.service_helpers import SAMPLES, tiny_model_folder

pytestmark = pytest.mark.cluster


def test_bench_cluster_times_every_source(tmp_path: Path) -> None:
    texts = [p.read_text(encoding="utf-8")[:300] for p in sorted(SAMPLES.iterdir())]
    data = tmp_path / "questions.json"
    ctxs = [{"title": f"t{i}", "text": text} for i, text in enumerate(texts[:2])]
    data.write_text(json.dumps([{"question": "Who?", "answers": ["x"], "ctxs": ctxs}]))
    out = tmp_path / "cluster.json"
    main(
        [
            "--data", str(data),
            "--model", str(tiny_model_folder()),
            "--dtype", "float32",
            "--questions", "1",
            "--passages", "2",
            "--repeats", "2",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert set(report["rows"]) == set(SOURCES)
    assert all(row["samples"] == 2 for row in report["rows"].values())
    assert report["rows"]["host"]["over_host"] == 1
    assert out.with_suffix(".md").read_text().count("| remote") == 3
