"""The serving benchmark end to end: it starts a tiny-model server on loopback, uploads
the corpus over HTTP and runs both cache modes; and it drives an already running server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.api.app import create_app
from ragcache.bench.serve import main
from ragcache.cli import main as cli_main
from tests.api.live_server import running_server, tiny_service
from tests.service_helpers import SAMPLES, tiny_flags

QUESTIONS = {
    "gettysburg_address.md": "What did Lincoln say at Gettysburg about the nation?",
    "declaration_of_independence.txt": "Which truths are held to be self-evident?",
    "tale_of_two_cities_opening.txt": "Was it the best of times or the worst of times?",
}


def musique_file(folder: Path) -> Path:
    """Samples as MuSiQue items: a question and the paragraphs of one file as passages."""
    items = []
    for name, question in QUESTIONS.items():
        paragraphs = [p.strip() for p in (SAMPLES / name).read_text().split("\n\n")]
        ctxs = [{"title": "", "text": p} for p in paragraphs if len(p) > 40]
        items.append({"question": question, "ctxs": ctxs, "answers": []})
    path = folder / "musique.json"
    path.write_text(json.dumps(items))
    return path


def load_options(data: Path, out: Path) -> list[str]:
    return [
        "--data", str(data), "--questions", "3", "--requests", "4", "--duration", "30",
        "--max-tokens", "3", "-k", "2", "--calibration-requests", "1", "--out", str(out),
    ]  # fmt: skip


def check_report(out: Path, rates: int) -> dict:
    report = json.loads(out.read_text())
    assert len(report["rates"]) == rates
    for entry in report["rates"]:
        assert entry["ttft_p50_ratio"] is not None and entry["ttft_p50_ratio"] > 0
        for mode in ("on", "off"):
            phase = entry[mode]
            assert phase["errors"] == 0 and phase["completed"] == phase["sent"] >= 1, phase
            assert phase["ttft_p50_s"] > 0 and phase["e2e_p50_s"] >= phase["ttft_p50_s"]
        assert entry["off"]["recompute_fraction"] == 1.0
        assert entry["off"]["chunk_share_by_tier"] == {"computed": 1.0}
        on_tiers = entry["on"]["chunk_share_by_tier"]
        assert sum(on_tiers.values()) == pytest.approx(1)
        if report["warmup"]["requests"]:
            assert on_tiers.get("computed", 0) == 0, on_tiers
        assert entry["on"]["recompute_fraction"] < 1.0
    assert set(report["verdict"]) >= {"rate", "ttft_p50_ratio", "meets_target"}
    markdown = out.with_suffix(".md").read_text()
    assert f"`{report['command']}`" in markdown.splitlines()[2]
    assert "TTFT p50 off/on" in markdown
    return report


def test_bench_serve_starts_a_server_and_compares_both_modes(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    flags = {k: v for k, v in tiny_flags(tmp_path / "unused").items() if k != "data_dir"}
    server_flags = [part for name, value in flags.items() for part in (f"--{name}", str(value))]
    argv = ["serve", *load_options(musique_file(tmp_path), out), *server_flags]
    assert cli_main(["bench", *argv]) == 0
    report = check_report(out, rates=3)
    assert report["server"]["started_here"] and report["corpus"]["uploaded"]
    assert report["calibration"]["rates"] == [entry["rate"] for entry in report["rates"]]
    assert report["warmup"]["requests"] == 3
    assert report["command"].startswith("python -m ragcache.bench.serve --data")


def test_bench_serve_drives_a_running_server(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    with tiny_service(tmp_path / "data") as service, running_server(create_app(service)) as url:
        argv = [*load_options(musique_file(tmp_path), out), "--url", url, "--rates", "2"]
        assert main([*argv, "--no-warmup"]) == 0
        first = check_report(out, rates=1)
        assert main(argv) == 0
    again = check_report(out, rates=1)
    assert first["corpus"]["uploaded"] and not again["corpus"]["uploaded"]
    assert again["calibration"] is None and not again["server"]["started_here"]


def test_bench_serve_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--rates", "1,fast"])
    assert "--rates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--url", "http://127.0.0.1:1", "--engine.block_size", "8"])
    assert "only apply without --url" in capsys.readouterr().err
