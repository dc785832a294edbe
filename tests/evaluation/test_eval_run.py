"""`ragcache eval` end to end on a tiny random model: outputs, baseline row, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.cli import main as cli_main
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


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in ITEMS))
    return path


def _eval(data: Path, out: Path, *settings: str, extra: tuple[str, ...] = ()) -> int:
    return cli_main(
        [
            "eval", "--data", str(data), "--model", str(tiny_model_folder()),
            "--passages", "3", "--max-new-tokens", "4", "--out", str(out),
            "--settings", *settings, *extra,
        ]
    )  # fmt: skip


def test_sweep_writes_every_output_with_the_baseline_row(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _eval(data, out, "full_reuse", "cacheblend:ratio=0.5") == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    summary = payload["summary"]
    assert list(summary) == ["full_prefill", "full_reuse", "cacheblend-0.5", "transformers"]
    assert payload["command"].startswith("ragcache eval --data")
    assert all(row["examples"] == 3 for row in summary.values())
    # Same checkpoint, same prompt: the transformers row answers exactly as full prefill.
    assert summary["transformers"]["agree16"] == 1.0
    assert summary["transformers"]["nll"] == pytest.approx(summary["full_prefill"]["nll"], abs=1e-3)
    assert summary["full_reuse"]["recompute_fraction"] == 0.0
    assert summary["cacheblend-0.5"]["recompute_fraction"] == pytest.approx(0.5, abs=0.05)
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4
    assert all(row["ttft_s"] > 0 and row["e2e_s"] >= row["ttft_s"] for row in rows)
    markdown = out.with_suffix(".md").read_text()
    assert "| full_reuse |" in markdown and payload["command"] in markdown
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_and_adds_only_new_settings(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _eval(data, out, "full_reuse", extra=("--no-baseline", "--questions", "2")) == 0
    first = out.with_suffix(".jsonl").read_text().splitlines()
    assert len(first) == 2 * 2
    assert _eval(data, out, "full_reuse", "legolink:k=4", extra=("--no-baseline",)) == 0
    lines = out.with_suffix(".jsonl").read_text().splitlines()
    assert lines[: len(first)] == first  # earlier results are kept, not recomputed
    done = {(json.loads(line)["example"], json.loads(line)["setting"]) for line in lines}
    assert len(lines) == len(done) == 3 * 3


def test_other_options_do_not_mix_into_old_results(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _eval(data, out, "full_reuse", extra=("--no-baseline", "--questions", "1")) == 0
    with pytest.raises(SystemExit, match=r"other options .*passages"):
        cli_main(
            ["eval", "--data", str(data), "--model", str(tiny_model_folder()), "--passages",
             "2", "--max-new-tokens", "4", "--out", str(out), "--no-baseline"]
        )  # fmt: skip


def test_bad_input_is_reported_before_any_model_work(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    assert cli_main(["eval", "--data", str(bad), "--model", str(tiny_model_folder())]) == 2
    assert "'ctxs' must be a non-empty list" in capsys.readouterr().err
    assert cli_main(["eval", "--settings", "nonsense"]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err


def test_a_corpus_in_the_service_with_a_questions_file(tmp_path: Path) -> None:
    from ragcache.config import load_config
    from ragcache.service import RagCache
    from tests.service_helpers import SAMPLES

    config_file = tmp_path / "ragcache.toml"
    config_file.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[model]\npath = "{tiny_model_folder()}"\ndtype = "float32"\n'
        "[engine]\nkv_cache_bytes = 8388608\n"
        "[retriever]\nchunk_tokens = 96\n"
        '[service]\nkv_precompute = "off"\n'
    )
    with RagCache(config=load_config(config_file, environ={})) as service:
        service.ingest(sorted(SAMPLES.iterdir())[:2], "library", create=True)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Who wrote it?", "answers": ["Austen"]}))
    out = tmp_path / "corpus_run"
    code = cli_main(
        ["eval", "--corpus", "library", "--questions-file", str(questions), "--config",
         str(config_file), "--model", str(tiny_model_folder()), "--passages", "2",
         "--max-new-tokens", "3", "--out", str(out), "--settings", "full_reuse"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["full_reuse"]["examples"] == 1
    assert summary["full_prefill"]["recomputed_tokens"] > 0


def test_offset_selects_a_slice_and_keeps_absolute_example_indices(
    data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    extra = ("--no-baseline", "--offset", "1", "--questions", "1")
    assert _eval(data, out, "full_reuse", extra=extra) == 0
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert {row["example"] for row in rows} == {1}
    assert _eval(data, out, "full_reuse", extra=("--offset", "3")) == 2  # nothing left


def test_chunks_on_lmdb_are_read_inside_ttft(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiers"
    settings = (
        "full_reuse",
        "cacheblend:ratio=0.5",
        "cacheblend:ratio=0.5,tier=lmdb",
        "cacheblend:ratio=0.5,tier=lmdb-int8",
        "cacheblend:ratio=0.5,tier=lmdb,load=whole",
    )
    extra = ("--no-baseline", "--questions", "2", "--chunk-tier", "host")
    assert _eval(data, out, *settings, extra=extra) == 0
    rows = {
        (row["example"], row["setting"]): row
        for row in map(json.loads, out.with_suffix(".jsonl").read_text().splitlines())
    }
    for (example, setting), row in rows.items():
        if setting == "full_prefill":
            assert row["read_s"] == 0.0
            continue
        assert 0 < row["read_wait_s"] <= row["read_s"]
        assert row["read_wait_s"] <= row["prepare_s"] <= row["ttft_s"]
        if "-lmdb" in setting and "int8" not in setting:  # the host tier's KV, exactly
            host = rows[(example, "cacheblend-0.5")]
            assert row["answer_ids"] == host["answer_ids"]
            assert row["nll"] == pytest.approx(host["nll"], abs=1e-5)
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert "cacheblend-0.5-lmdb-whole" in summary
    assert "first_token_vs_raw" in summary["cacheblend-0.5-lmdb-int8"]
    assert summary["full_reuse"]["bound_speedup"] > 1.0
    assert "bound_share" in summary["cacheblend-0.5"]


def test_an_unknown_tier_in_a_setting_is_refused(data: Path, tmp_path: Path) -> None:
    assert _eval(data, tmp_path / "bad", "full_reuse:tier=ssd") == 2
