"""A local ``redis-server`` (Debian's package) on loopback, for tests, benchmarks and the
one-machine cluster: a free port, its own directory, no persistence unless asked.

Production deployments point ``chunkstore.remote_url`` at a Redis they run themselves;
this class only starts one for a single machine.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

INSTALL_HINT = "install it with `apt-get install redis-server` (Debian/Ubuntu)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError(f"redis-server is not on PATH; {INSTALL_HINT}")
    return found


class LocalRedis:
    """``redis-server`` bound to 127.0.0.1. ``stop`` ends it; ``kill`` sends SIGKILL, as a
    crash would; ``start`` again reuses the port (and, with ``persist``, the data)."""

    def __init__(
        self,
        port: int | None = None,
        directory: str | Path | None = None,
        maxmemory_bytes: int = 0,
        persist: bool = False,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="ragcache-redis-"))
        self.maxmemory_bytes = maxmemory_bytes
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _arguments(self) -> list[str]:
        arguments = [
            redis_server_binary(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
            "--save", "60 1" if self.persist else "",
            "--appendonly", "yes" if self.persist else "no",
            # A persisted Redis holds what must survive (the corpus log): fsync every write.
            "--appendfsync", "always" if self.persist else "everysec",
        ]  # fmt: skip
        if self.maxmemory_bytes:
            arguments += ["--maxmemory", str(self.maxmemory_bytes)]
        return arguments

    def start(self, timeout_s: float = 10.0) -> LocalRedis:
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self._arguments(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode} on port {self.port}: "
                    f"{error.strip() or 'see ' + str(self.directory / 'redis.log')}"
                )
            if self._answers():
                return self
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"redis-server did not answer on {self.url} within {timeout_s} s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, how: signal.Signals) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(how)
            self.process.wait(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
