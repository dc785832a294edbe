"""The ``ragcache`` command: help, ingest, query, cache, and serve as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ragcache.bench import BENCHMARKS
from ragcache.cli import main
from ragcache.config import Config, iter_fields
from tests.service_helpers import SAMPLES, free_port, tiny_flags

QUESTION = "What did Lincoln say at Gettysburg about the nation?"


def flag_args(data_dir: Path) -> list[str]:
    return [
        part for name, value in tiny_flags(data_dir).items() for part in (f"--{name}", str(value))
    ]


def test_serve_help_lists_every_config_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name, _, text in iter_fields(Config()):
        assert f"--{name} " in out and text in out, name


@pytest.mark.parametrize("argv", [["bench"], ["bench", "--help"]])
def test_bench_lists_every_benchmark(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name, what in BENCHMARKS.items():
        assert f"  {name} " in out and what in out, name


def test_every_listed_benchmark_shows_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as done:
            main(["bench", name, "--help"])
        assert done.value.code == 0, name
        assert "--out" in capsys.readouterr().out, name
    assert main(["bench", "nonexistent"]) == 2
    assert "unknown benchmark 'nonexistent'" in capsys.readouterr().err


def test_bench_speculate_is_wired_and_refuses_unknown_proposers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["bench", "speculate", "--help"])
    assert done.value.code == 0
    assert "--proposers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["bench", "speculate", "--proposers", "medusa"])
    assert refused.value.code == 2
    assert "--proposers takes ngram and/or early_exit" in capsys.readouterr().err


def test_ingest_query_and_cache_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = flag_args(tmp_path / "data")
    assert main(["ingest", str(SAMPLES), "--corpus", "sample", *flags]) == 0
    assert "4 added" in capsys.readouterr().out
    assert (
        main(["query", QUESTION, "--corpus", "sample", "--method", "legolink", "--json", *flags])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["cache"]["method"] == "legolink"
    assert result["sources"][0]["source"].endswith("gettysburg_address.md")
    assert main(["cache", "stats", *flags]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["chunks"]["tiers"]["disk"]["entries"] > 0


def test_query_under_a_lora_adapter_named_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.lora_helpers import make_peft_adapter
    from tests.service_helpers import tiny_loaded

    adapter = tmp_path / "legal"
    make_peft_adapter(adapter, seed=31, model={"vocab_size": len(tiny_loaded().tokenizer)})
    flags = flag_args(tmp_path / "data")
    gettysburg = str(SAMPLES / "gettysburg_address.md")
    assert main(["ingest", gettysburg, "--corpus", "speech", *flags]) == 0
    capsys.readouterr()
    lora = ["--lora", f"legal={adapter}", "--adapter", "legal", "--json", "-k", "1"]
    assert main(["query", QUESTION, "--corpus", "speech", *lora, *flags]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache"]["computed_tokens"] > 0 and not result["cache"]["tokens_by_tier"]
    assert main(["query", QUESTION, "--corpus", "speech", "--adapter", "nope", *flags]) == 2
    assert "adapter 'nope' is not loaded" in capsys.readouterr().err


def test_bad_config_flags_exit_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "stats", "--engine.no_such_field", "1"]) == 2
    assert "unknown config field 'engine.no_such_field'" in capsys.readouterr().err
    assert main(["cache", "stats", "--engine.block_size"]) == 2
    assert "needs a value" in capsys.readouterr().err


def test_serve_sample_binds_loopback_without_keys(tmp_path: Path) -> None:
    port = free_port()
    flags = flag_args(tmp_path / "data")
    command = [
        sys.executable,
        "-m",
        "ragcache.cli",
        "serve",
        "--sample",
        *flags,
        "--server.host",
        "0.0.0.0",
        "--server.port",
        str(port),
        "--log_level",
        "warning",
    ]
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        output = []
        assert child.stdout is not None
        for line in child.stdout:
            output.append(line)
            if "curl" in line:
                break
        text = "".join(output)
        assert "loopback only" in text and f"http://127.0.0.1:{port}" in text, text
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and child.poll() is None, text
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        body = {"query": QUESTION, "corpus": "sample", "max_tokens": 4}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/query", json=body, timeout=60).json()
        assert answer["sources"] and answer["cache"]["tokens_by_tier"]
    finally:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def test_version_and_the_eval_data_dir_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("ragcache ")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--data_dir" in capsys.readouterr().out


def test_cache_gc_removes_orphans_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ragcache.chunkstore import ChunkStore, ChunkStoreConfig
    from tests.chunkstore.helpers import ROOT_KEY, make_entry

    data = tmp_path / "data"
    flags = flag_args(data)
    assert main(["ingest", str(SAMPLES / "gettysburg_address.md"), "--corpus", "s", *flags]) == 0
    capsys.readouterr()
    # An entry cached after a chunk the store no longer holds: no lookup reaches it.
    store = ChunkStore(ChunkStoreConfig(disk_initial_map_bytes=1 << 20), data / "chunks")
    entries = store.stats()["tiers"]["disk"]["entries"]
    store.put(make_entry(7, parent_keys=[ROOT_KEY, "0" * 40]))
    store.close()

    assert main(["cache", "gc", *flags]) == 0
    out = capsys.readouterr().out
    assert "cache gc at start-up: 0 pending records settled; 1 chunk entries removed" in out
    assert "disk file compacted" in out
    assert "cache gc: 0 pending records settled; 0 chunk entries removed" in out
    assert main(["cache", "stats", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"]["tiers"]["disk"]["entries"] == entries
