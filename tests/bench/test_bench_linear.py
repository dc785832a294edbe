"""The projection benchmark writes its JSON and a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from ragcache.bench import linear as bench_linear


def test_bench_linear_writes_a_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "linear.json"
    bench_linear.main(["--out", str(out), "--rows", "1", "4", "--layers", "1", "--repeats", "1"])
    report = json.loads(out.read_text())
    rows = {(r["rows"], r["product"]) for r in report["results"]}
    assert (1, "F.linear (MKL)") in rows and (4, "weight-major") in rows
    assert all(r["ms_per_layer"] > 0 for r in report["results"])
    assert "| 4 |" in out.with_suffix(".md").read_text()
