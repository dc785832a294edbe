"""The codec benchmark end to end on the tiny model: a table, JSON, exact raw rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.bench.codec_cachegen import codec_from_spec, main
from tests.service_helpers import SAMPLES, tiny_model_folder


def write_questions(path: Path) -> Path:
    texts = [p.read_text(encoding="utf-8")[:400] for p in sorted(SAMPLES.iterdir())]
    items = [
        {
            "question": f"What does passage {i} say?",
            "answers": ["x"],
            "ctxs": [{"title": f"t{j}", "text": texts[(i + j) % len(texts)]} for j in range(2)],
        }
        for i in range(2)
    ]
    path.write_text(json.dumps(items))
    return path


def test_codec_bench_reports_every_codec(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "codec.json"
    main(
        [
            "--data", str(write_questions(tmp_path / "questions.json")),
            "--model", str(tiny_model_folder()),
            "--dtype", "float32",
            "--questions", "2",
            "--passages", "2",
            "--max-tokens", "2",
            "--codecs", "raw", "int8", "cachegen", "cachegen:0.9,0.5",
            "--out", str(out),
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())["summary"]
    assert set(rows) == {"raw", "int8", "cachegen", "cachegen:0.9,0.5"}
    assert rows["raw"]["relative_l2_error"] == 0
    assert rows["raw"]["first_token_agreement"] == 1
    assert rows["cachegen"]["bytes_per_token"] < rows["int8"]["bytes_per_token"]
    assert rows["int8"]["int8_over_this"] == pytest.approx(1)
    assert "| cachegen |" in capsys.readouterr().out


def test_codec_specs() -> None:
    assert codec_from_spec("int8").name == "int8"
    plan_codec = codec_from_spec("cachegen:0.3,0.6")
    assert plan_codec.name == "cachegen"
    with pytest.raises(ValueError, match="only cachegen"):
        codec_from_spec("int8:0.5")
