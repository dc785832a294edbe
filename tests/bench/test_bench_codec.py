"""The int8-vs-raw answer comparison end to end on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

from ragcache.bench.codec import main
from tests.service_helpers import tiny_model_folder

ITEMS = [
    {
        "question": f"Which river runs through town {n}?",
        "answers": ["Avon"],
        "ctxs": [
            {"title": f"Town {n}", "text": "The river Avon runs through the old town."},
            {"title": "Bridges", "text": "Three stone bridges cross it near the market."},
            {"title": "Mills", "text": "Two mills stood on its banks until 1900."},
        ],
    }
    for n in range(3)
]


def test_compares_int8_answers_with_raw_and_writes_the_report(tmp_path: Path) -> None:
    data = tmp_path / "items.json"
    data.write_text(json.dumps(ITEMS))
    out = tmp_path / "codec.json"
    argv = ["--data", str(data), "--model", str(tiny_model_folder()), "--dtype", "float32"]
    main([*argv, "--passages", "2", "3", "--max-tokens", "4", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m ragcache.bench.codec --data")
    assert set(report["summary"]) == {"2", "3", "all"}
    assert report["summary"]["all"]["questions"] == 6
    assert len(report["pairs"]) == 6
    for pair in report["pairs"]:
        assert len(pair["raw_ids"]) == len(pair["int8_ids"]) == 4
        # Per token and head the int8 error is at most max|x| / 254 (fp32 output).
        assert 0 < pair["kv_max_error"] <= 1 / 254 + 1e-6
    rows = report["summary"].values()
    assert all(0.0 <= row["first_token_agreement"] <= 1.0 for row in rows)
