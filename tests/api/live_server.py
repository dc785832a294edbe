"""A uvicorn server on 127.0.0.1 in a thread, for tests that speak real HTTP."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from ragcache.config import Config
from ragcache.service import RagCache
from tests.service_helpers import free_port, minilm, tiny_config, tiny_loaded


@contextmanager
def running_server(app: FastAPI) -> Iterator[str]:
    """Serves ``app`` until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_service(data_dir: Path, **server: object) -> RagCache:
    config: Config = tiny_config(data_dir)
    config.service.kv_precompute = "lazy"
    for name, value in server.items():
        setattr(config.server, name, value)
    return RagCache(config=config, loaded=tiny_loaded(), embedder=minilm())
