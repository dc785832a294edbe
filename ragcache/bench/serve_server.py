"""The server under test: a ``ragcache serve`` child process on loopback, and the corpus
uploaded to it through the HTTP API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

import ragcache

START_TIMEOUT_S = 300.0


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """``ragcache serve`` in a child process on 127.0.0.1 with its own data directory.

    ``flags`` are config flags (``--section.field VALUE``) for the child; later flags win,
    so they may override the defaults given here.
    """

    def __init__(self, data_dir: Path, flags: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "server.log"
        self.command = [
            sys.executable,
            "-m",
            "ragcache.cli",
            "serve",
            "--data_dir",
            str(data_dir),
            "--server.host",
            "127.0.0.1",
            "--log_level",
            "warning",
            *flags,
            "--server.port",
            str(self.port),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        package_root = str(Path(ragcache.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            self._wait_until_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_until_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {self.process.returncode} before it was "
                    f"ready; its log ends with:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server was not healthy within {START_TIMEOUT_S:g} s; its log ends "
                    f"with:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _check(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 400:
        raise RuntimeError(f"{what} failed: HTTP {response.status_code} {response.text[:300]}")
    return response.json()


def ensure_corpus(
    client: httpx.Client, name: str, files: list[tuple[str, bytes]], timeout_s: float = 1800
) -> dict[str, Any]:
    """Creates corpus ``name`` and uploads ``files`` unless it already holds documents;
    waits for the ingest job. Returns what was done, for the report."""
    existing = client.get(f"/v1/corpora/{name}")
    uploaded = not (existing.status_code == 200 and existing.json().get("num_documents", 0) > 0)
    ingest: dict[str, Any] = {}
    if uploaded:
        if existing.status_code == 404:
            _check(client.post("/v1/corpora", json={"name": name}), f"creating corpus {name!r}")
        else:
            _check(existing, f"reading corpus {name!r}")
        ingest = _upload(client, name, files, timeout_s)
    info = _check(client.get(f"/v1/corpora/{name}"), f"reading corpus {name!r}")
    return {
        "name": name,
        "uploaded": uploaded,
        "documents": info["num_documents"],
        "chunks": info["num_chunks"],
        **ingest,
    }


def _upload(
    client: httpx.Client, name: str, files: list[tuple[str, bytes]], timeout_s: float
) -> dict[str, Any]:
    parts = [("files", (file_name, data, "text/plain")) for file_name, data in files]
    began = time.perf_counter()
    job = _check(client.post(f"/v1/corpora/{name}/documents", files=parts), "the upload")
    deadline = time.monotonic() + timeout_s
    while job["status"] not in ("succeeded", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"ingest job {job['job_id']} did not finish in {timeout_s:g} s")
        time.sleep(0.5)
        job = _check(client.get(f"/v1/jobs/{job['job_id']}"), "polling the ingest job")
    if job["status"] == "failed":
        raise RuntimeError(f"ingest job {job['job_id']} failed: {job['error']}")
    result = job["result"] or {}
    return {
        "ingest_s": time.perf_counter() - began,
        "kv_chunks_computed_at_ingest": result.get("kv_chunks_computed"),
    }
