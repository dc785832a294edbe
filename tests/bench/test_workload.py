"""The workload benchmark: its request stream, and a whole run on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from ragcache.bench.workload import main
from ragcache.bench.workload_stream import request_stream
from tests.service_helpers import SAMPLES, tiny_model_folder


def test_the_stream_is_seeded_zipf_popular_and_reorders_a_share_of_repeats() -> None:
    stream = request_stream(pool=100, requests=400, passages=4, seed=0)
    again = request_stream(pool=100, requests=400, passages=4, seed=0)
    other = request_stream(pool=100, requests=400, passages=4, seed=1)
    assert stream == again and stream != other
    assert stream[:50] == request_stream(pool=100, requests=50, passages=4, seed=0)
    repeats = [r for r in stream if r.repeat]
    reordered = [r for r in repeats if r.reordered]
    assert 0.2 < len(reordered) / len(repeats) < 0.4
    assert all(r.order != (0, 1, 2, 3) and sorted(r.order) == [0, 1, 2, 3] for r in reordered)
    assert all(r.order == (0, 1, 2, 3) for r in stream if not r.reordered)
    counts: dict[int, int] = {}
    for r in stream:
        counts[r.question] = counts.get(r.question, 0) + 1
    top = sorted(counts.values(), reverse=True)
    assert top[0] > 5 * top[len(top) // 2], "a few questions carry most requests"


def tiny_data(path: Path) -> Path:
    paragraphs = []
    for sample in sorted(SAMPLES.iterdir()):
        text = sample.read_text(encoding="utf-8")
        paragraphs += [p.strip()[:300] for p in text.split("\n\n") if len(p.strip()) > 80]
    items = [
        {
            "question": f"What does passage {n} say?",
            "answers": ["nation"],
            "ctxs": [{"title": "", "text": t} for t in paragraphs[3 * n : 3 * n + 3]],
        }
        for n in range(3)
    ]
    path.write_text(json.dumps(items))
    return path


def tiny_run(tmp_path: Path, *extra: str) -> tuple[list[str], Path]:
    """Arguments of a run over three tiny questions on the tiny model, and its --out."""
    data = tiny_data(tmp_path / "data.json")
    out = tmp_path / "workload.json"
    argv = ["--data", str(data), "--questions", "3", "--passages", "3", "--max-tokens", "4"]
    return [*argv, *extra, "--model", str(tiny_model_folder()), "--out", str(out)], out


def test_a_run_compares_every_setting_on_the_same_requests(tmp_path: Path) -> None:
    argv, out = tiny_run(tmp_path, "--requests", "8")
    assert main(argv) == 0
    report = json.loads(out.read_text())
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    references = [line for line in lines if line["kind"] == "reference"]
    assert report["requests_done"] == 8
    settings = report["settings"]
    assert sorted(settings) == ["cacheblend", "cachecraft", "prefix", "tree"]
    for figures in settings.values():
        shares = figures["exact_share"] + figures["repaired_share"] + figures["recomputed_share"]
        assert abs(shares - 1.0) < 1e-9 and figures["requests"] == 8
    repeats = settings["tree"]["same_order_repeats"]
    assert repeats > 0 and settings["tree"]["same_order_repeats_answer_equal"] == repeats
    assert settings["tree"]["exact_share"] > 0 and settings["cacheblend"]["exact_share"] == 0
    assert settings["prefix"]["repaired_share"] == 0
    # A second run of the same stream reuses the references and replays the settings.
    assert main([*argv, "--settings", "cachecraft"]) == 0
    again = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [line for line in again if line["kind"] == "reference"] == references
    assert sum(line.get("setting") == "cachecraft" for line in again) == 8
    assert main([*argv, "--summarize"]) == 0
    assert sorted(json.loads(out.read_text())["settings"]) == sorted(settings)


def test_a_stopped_run_resumes_where_each_setting_stopped(tmp_path: Path) -> None:
    argv, out = tiny_run(tmp_path, "--settings", "prefix,tree")
    # The first 5 requests of the 8-request stream are the 5-request stream: a run of 5
    # is a run of 8 stopped after 5.
    assert main([*argv, "--requests", "5"]) == 0
    state = out.with_suffix(".state")
    assert sorted(p.name for p in state.iterdir()) == ["prefix", "tree"]
    assert main([*argv, "--requests", "8", "--resume"]) == 0
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    for setting in ("prefix", "tree"):
        numbers = [line["number"] for line in lines if line.get("setting") == setting]
        assert numbers == list(range(8)), "each request served once per setting"
    assert [line["at"] for line in lines if line["kind"] == "resume"] == [5]
    report = json.loads(out.read_text())
    assert report["requests_done"] == 8 and report["resumed_at_requests"] == [5]
    assert "Resumed after requests 5" in out.with_suffix(".md").read_text()
    # A new run (no --resume) starts from empty caches: no resume, no old state.
    assert main([*argv, "--requests", "3"]) == 0
    fresh = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert not [line for line in fresh if line["kind"] == "resume"]
    assert json.loads(out.read_text())["requests_done"] == 3
