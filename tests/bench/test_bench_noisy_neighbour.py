"""The noisy-neighbour benchmark end to end on a tiny-model server: tenant B sees no
error in either phase, and every bad request of tenant A is refused with a 4xx. Latency
is reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.api.app import create_app
from ragcache.bench.noisy_neighbour import KEYS, main
from ragcache.cli import main as cli_main
from tests.api.live_server import running_server, tiny_service
from tests.bench.test_bench_serve import musique_file
from tests.service_helpers import tiny_flags


def server_flags(tmp_path: Path) -> list[str]:
    flags = {k: v for k, v in tiny_flags(tmp_path / "unused").items() if k != "data_dir"}
    return [part for name, value in flags.items() for part in (f"--{name}", str(value))]


def test_tenant_b_sees_no_error_beside_tenant_a(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [
        "noisy_neighbour", "--data", str(musique_file(tmp_path)), "--questions", "1",
        "--ingest-questions", "2", "--rate", "2", "--duration", "4", "--bad-rate", "10",
        "--max-tokens", "3", "-k", "2", "--out", str(out), *server_flags(tmp_path),
    ]  # fmt: skip
    assert cli_main(["bench", *argv]) == 0
    report = json.loads(out.read_text())
    for name in ("quiet", "noisy"):
        phase = report["phases"][name]
        assert phase["sent"] == 8 and phase["errors"] == 0, phase
        assert phase["completed"] == phase["sent"]
    noise = report["tenant_a"]
    assert noise["ingest_files"] > 0 and noise["ingest_job"]
    assert noise["bad_requests_sent"] >= 10
    assert noise["bad_requests_not_refused_with_4xx"] == []
    assert all(400 <= int(status) < 500 for status in noise["bad_request_statuses"])
    assert report["verdict"]["errors_b"] == 0 and report["verdict"]["bad_requests_not_4xx"] == 0
    markdown = out.with_suffix(".md").read_text()
    assert f"`{report['command']}`" in markdown and "noisy/quiet e2e p50" in markdown
    assert report["command"].startswith("python -m ragcache.bench.noisy_neighbour --data")


def test_noisy_neighbour_drives_a_running_server(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    keys = ",".join(f"{key}={tenant}" for tenant, key in KEYS.items())
    with tiny_service(tmp_path / "data", api_keys=keys) as service:
        with running_server(create_app(service)) as url:
            argv = [
                "--url", url, "--data", str(musique_file(tmp_path)), "--questions", "1",
                "--ingest-questions", "1", "--rate", "2", "--duration", "2", "--max-tokens", "2",
                "--out", str(out),
            ]  # fmt: skip
            assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["server"]["url"] == url
    assert report["verdict"]["errors_b"] == 0 and report["verdict"]["bad_requests_not_4xx"] == 0
    assert report["tenant_a"]["bad_requests_sent"] >= 1


def test_noisy_neighbour_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--rate", "0"])
    assert "--rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--url", "http://127.0.0.1:1", "--engine.block_size", "8"])
    assert "only apply without --url" in capsys.readouterr().err
