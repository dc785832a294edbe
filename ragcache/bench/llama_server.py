"""llama.cpp's ``llama-server`` on the same GGUF file, serving the engine benchmark's workload.

Build it with ``scripts/build-llama-cpp`` (it installs ``llama-server`` and ``llama-bench``
under ``~/.cache/ragcache/llama.cpp/bin``), or name a binary with ``--llama-server`` or
``RAGCACHE_LLAMA_SERVER``. The server gets as many parallel slots as the engine's batch
(``-np``), each with room for the workload's longest request, and the same thread count.
Every request goes to ``/completion`` at t=0 with its prompt as token ids, greedy
(``top_k`` 1), end-of-sequence ignored and no prompt cache, streamed, so each token's
arrival time is measured as the engine's are.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ragcache.bench.engine_records import BenchRequest, RequestTiming

BINARY_ENV = "RAGCACHE_LLAMA_SERVER"
DEFAULT_BINARY = Path("~/.cache/ragcache/llama.cpp/bin/llama-server")
BUILD_HINT = "llama-server not found: run scripts/build-llama-cpp, or pass --llama-server PATH"
START_TIMEOUT_S = 180.0
UNKNOWN_TOKEN = -1  # a generated token the stream counted but did not send


def locate_llama_server(explicit: str | None = None) -> Path | None:
    """The binary named, else ``$RAGCACHE_LLAMA_SERVER``, the build script's, or PATH's."""
    for candidate in (explicit, os.environ.get(BINARY_ENV)):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"llama-server binary {path} does not exist")
            return path
    built = DEFAULT_BINARY.expanduser()
    if built.is_file():
        return built
    found = shutil.which("llama-server")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_llama_server(
    binary: Path, gguf: Path, slots: int, slot_context: int, threads: int
) -> Iterator[tuple[str, Path]]:
    """A llama-server on loopback until the block ends; yields its base URL and its log
    file (quoted in the error when it fails to start)."""
    port = free_port()
    command = [
        str(binary),
        "--model", str(gguf),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--parallel", str(slots),
        "--ctx-size", str(slots * slot_context),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--batch-size", "2048",
        "--ubatch-size", "512",
        "--no-webui",
    ]  # fmt: skip
    with tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="llama-server-") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_ready(process, url, Path(log.name))
            yield url, Path(log.name)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"llama-server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"llama-server did not answer /health within {START_TIMEOUT_S:.0f} s")


async def _one_request(
    client: httpx.AsyncClient, url: str, request: BenchRequest, start: float
) -> RequestTiming:
    timing = RequestTiming(len(request.prompt_ids), start)
    payload = {
        "prompt": request.prompt_ids,
        "n_predict": request.output_len,
        "ignore_eos": True,
        "top_k": 1,
        "temperature": 0.0,
        "cache_prompt": False,
        "stream": True,
        "return_tokens": True,
    }
    async with client.stream("POST", f"{url}/completion", json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode(errors="replace")
            raise RuntimeError(f"llama-server answered {response.status_code}: {body[:500]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[len("data: ") :])
            tokens = chunk.get("tokens") or []
            now = time.perf_counter()
            timing.token_times.extend(now for _ in tokens)
            timing.token_ids.extend(int(t) for t in tokens)
            if chunk.get("stop"):
                # A token whose text ends inside a UTF-8 character can reach the end
                # unsent: it counts, at the last chunk's time, with an unknown id.
                missing = int(chunk.get("tokens_predicted", 0)) - len(timing.token_ids)
                timing.token_times.extend(now for _ in range(missing))
                timing.token_ids.extend(UNKNOWN_TOKEN for _ in range(missing))
    if len(timing.token_ids) != request.output_len:
        raise RuntimeError(
            f"llama-server returned {len(timing.token_ids)} tokens, not {request.output_len}"
        )
    return timing


async def _serve_all(url: str, workload: list[BenchRequest]) -> tuple[list[RequestTiming], float]:
    # No connection is kept for reuse: the server may close one after a streamed reply,
    # and a request sent on it then fails.
    limits = httpx.Limits(max_connections=len(workload) + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits, trust_env=False) as client:
        warm = BenchRequest(workload[0].prompt_ids[:32], 4)
        await _one_request(client, url, warm, time.perf_counter())
        start = time.perf_counter()
        timings = await asyncio.gather(
            *(_one_request(client, url, request, start) for request in workload)
        )
        return list(timings), time.perf_counter() - start


def serve_with_llama_server(
    binary: Path, gguf: Path, workload: list[BenchRequest], slots: int, threads: int
) -> tuple[list[RequestTiming], float]:
    """Every request submitted at t=0 to a fresh server; per-request timings and the
    seconds until the last one finished."""
    slot_context = max(len(r.prompt_ids) + r.output_len for r in workload) + 16
    with running_llama_server(binary, gguf, slots, slot_context, threads) as (url, log):
        try:
            return asyncio.run(_serve_all(url, workload))
        except httpx.HTTPError as failure:
            tail = log.read_text(errors="replace")[-3000:]
            message = f"llama-server request failed ({failure!r}); its log:\n{tail}"
            raise RuntimeError(message) from failure
