"""The llama-server baseline of the serving benchmark: locating the binary, the report
lines, and (where scripts/build-llama-cpp has built it) a real server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragcache.bench.engine_records import BenchRequest
from ragcache.bench.engine_report import llama_server_lines
from ragcache.bench.llama_server import (
    BINARY_ENV,
    locate_llama_server,
    serve_with_llama_server,
)
from ragcache.engine.loader import locate_embedded_gguf


def test_a_named_binary_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_llama_server(str(tmp_path / "llama-server"))


def test_the_environment_names_the_binary(tmp_path: Path, monkeypatch) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("")
    monkeypatch.setenv(BINARY_ENV, str(binary))
    assert locate_llama_server() == binary


def test_a_skipped_baseline_says_why() -> None:
    lines = llama_server_lines({"llama_server": {"skipped": "llama-server not found"}})
    assert lines == ["\nllama-server: llama-server not found"]


def test_the_comparison_lines_carry_both_sides_and_the_ratio() -> None:
    def metrics(rate: float) -> dict:
        latency = {"median_ms": 10.0}
        return {
            "request_throughput": rate,
            "output_token_throughput": rate * 10,
            "total_token_throughput": rate * 100,
            "ttft": latency,
            "tpot": latency,
            "e2e": latency,
        }

    report = {
        "engine": metrics(2.0),
        "llama_server": {
            "slots": 32,
            "metrics": metrics(1.0),
            "total_token_throughput_ratio": 2.0,
            "target_ratio": 1.5,
            "greedy_agreement": {
                "identical_requests": 3,
                "compared_requests": 4,
                "mean_identical_leading_tokens": 50.0,
            },
        },
    }
    text = "\n".join(llama_server_lines(report))
    assert "| total token throughput (tok/s) | 200.00 | 100.00 |" in text
    assert "2.00x (target >= 1.5x)" in text
    assert "identical on 3 of 4 requests" in text


@pytest.mark.slow
def test_a_real_llama_server_serves_concurrent_requests_with_every_token() -> None:
    binary = locate_llama_server()
    if binary is None:
        pytest.skip("llama-server is not built (scripts/build-llama-cpp)")
    prompt = list(range(1000, 1100))
    workload = [BenchRequest(prompt, 12), BenchRequest(prompt[:60], 7)]
    timings, duration = serve_with_llama_server(
        binary, locate_embedded_gguf(), workload, slots=2, threads=2
    )
    assert duration > 0
    assert [len(t.token_ids) for t in timings] == [12, 7]
    for timing in timings:
        assert timing.token_times == sorted(timing.token_times)
        assert timing.ttft > 0
    # Greedy and without a prompt cache: the same prompt prefix gives the same first token.
    assert (
        timings[0].token_ids[0]
        == serve_with_llama_server(
            binary, locate_embedded_gguf(), workload[:1], slots=1, threads=2
        )[0][0].token_ids[0]
    )
