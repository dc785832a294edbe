"""``ragcache cluster`` as a user runs it: Redis, Ray and a replica on this machine, the
single server's routes on the printed URL, and a clean shutdown on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import free_port, tiny_flags

pytest.importorskip("ray")
pytestmark = pytest.mark.cluster

REPOSITORY = Path(__file__).resolve().parents[2]
READY = re.compile(r"ragcache cluster at (\S+): .* chunk tier (\S+), corpus log (\S+)")


def answers(url: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def test_cluster_command_serves_and_shuts_down_cleanly(tmp_path: Path) -> None:
    flags = {**tiny_flags(tmp_path / "unused"), "chunkstore.cost_model": "default"}
    flags.pop("data_dir")
    settings = [arg for name, value in flags.items() for arg in ("--set", f"{name}={value}")]
    port = free_port()
    command = [
        sys.executable, "-m", "ragcache.cli", "cluster",
        "--replicas", "1", "--data-root", str(tmp_path / "cluster"), "--port", str(port),
        *settings,
    ]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 600
        ready = None
        seen = []
        while ready is None:
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(seen[-40:])
            assert time.monotonic() < deadline, "".join(seen[-40:])
            seen.append(line)
            ready = READY.search(line)
        base, chunk_tier, corpus_log = ready.groups()
        assert answers(chunk_tier) and answers(corpus_log)
        assert httpx.get(f"{base}/health", timeout=60).status_code == 200
        created = httpx.post(f"{base}/v1/corpora", json={"name": "notes"}, timeout=60)
        assert created.status_code == 201, created.text
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=180)[0]
        assert process.returncode == 0, "".join(seen[-20:]) + rest[-6000:]
        assert "shutting down" in rest
        assert not answers(chunk_tier) and not answers(corpus_log)
        assert (tmp_path / "cluster" / "redis-corpora" / "appendonlydir").is_dir()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
