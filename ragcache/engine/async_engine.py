"""A background thread that steps the engine, and an async token stream per request.

The engine's state is touched only by the loop thread; callers enqueue commands.
Abandoning a stream (the client went away) aborts its request, which frees its
blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ragcache.engine.engine import Engine
from ragcache.engine.outputs import RequestFailedError, RequestOutput
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import PlacedKV

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Submit:
    prompt: str | list[int]
    params: SamplingParams
    request_id: str
    placed: PlacedKV | None
    cache_salt: str
    use_prefix_cache: bool
    deliver: Callable[[RequestOutput | BaseException], None]
    adapter: str | None = None


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Any] = queue.Queue()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._counter = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ragcache-engine", daemon=True)
        self._thread.start()

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"cmpl-{self._counter}"

    def run_sync(self, fn: Callable[[Engine], Any]) -> Any:
        """Run ``fn(engine)`` on the loop thread between steps and return its result."""
        done = threading.Event()
        box: list[Any] = []

        def call(engine: Engine) -> None:
            try:
                box.append(fn(engine))
            except BaseException as exc:  # handed back to the caller
                box.append(exc)
            done.set()

        self._commands.put(("call", call))
        self._wake.set()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        placed: PlacedKV | None = None,
        cache_salt: str = "",
        use_prefix_cache: bool = True,
        adapter: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        rid = request_id or self._next_id()

        def deliver(item: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        self._commands.put(
            _Submit(prompt, params, rid, placed, cache_salt, use_prefix_cache, deliver, adapter)
        )
        self._wake.set()
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, **kw: Any
    ) -> RequestOutput:
        last: RequestOutput | None = None
        async for out in self.stream(prompt, params, **kw):
            last = out
        assert last is not None
        return last

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Submit):
                try:
                    self.engine.add_request(
                        command.prompt,
                        command.params,
                        command.request_id,
                        command.placed,
                        command.cache_salt,
                        command.use_prefix_cache,
                        command.adapter,
                    )
                    self._sinks[command.request_id] = command.deliver
                except Exception as exc:
                    command.deliver(exc)
            elif command[0] == "abort":
                self.engine.abort(command[1])
                self._sinks.pop(command[1], None)
            elif command[0] == "call":
                command[1](self.engine)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                # Per-sequence faults are isolated inside the step; this one hit the step itself.
                log.exception("engine step failed; failing the running requests")
                for rid, sink in list(self._sinks.items()):
                    self.engine.abort(rid)
                    sink(exc)
                self._sinks.clear()
                continue
            for output in outputs:
                sink = self._sinks.get(output.request_id)
                if sink is not None:
                    sink(output if output.failure is None else _failed(output))
                if output.finished:
                    self._sinks.pop(output.request_id, None)


def _failed(output: RequestOutput) -> RequestFailedError:
    error = RequestFailedError(output.error or "the engine failed on this request")
    error.__cause__ = output.failure
    return error
