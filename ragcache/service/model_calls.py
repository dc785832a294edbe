"""The service's model calls (chunk encoding, fusion) waiting for the engine thread, in
cache-aware order.

The engine thread runs these calls one at a time between decoding steps. A query whose
chunks are all cached needs one short call (fusion); a query with missing chunks first
needs their encoding, split into calls of at most ``service.kv_batch_tokens`` tokens.
With the cache_aware policy the waiting calls go most reused tokens per token to compute
first, so a cached query is not held behind a cold query's encoding; a call whose query
has waited past the starvation bound goes first, oldest first. With fcfs they go in
arrival order. Only the order changes: every call computes what it would have anyway.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.engine import Engine


@dataclass(slots=True, frozen=True)
class QueryCost:
    """What a query reuses and computes, and when it reached the service."""

    reused_tokens: int
    compute_tokens: int
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class _Call:
    fn: Callable[[Engine], Any]
    cost: QueryCost
    order: int
    result: Future[Any] = field(default_factory=Future)


class ModelCallQueue:
    def __init__(self, engine: AsyncEngine, cache_aware: bool, starvation_s: float) -> None:
        if not starvation_s >= 0:
            raise ValueError(f"starvation_s={starvation_s} must be >= 0 seconds")
        self.engine = engine
        self.cache_aware = cache_aware
        self.starvation_s = starvation_s
        self._waiting: list[_Call] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="ragcache-calls", daemon=True)
        self._thread.start()

    def run(self, fn: Callable[[Engine], Any], cost: QueryCost) -> Any:
        """``fn(engine)`` on the engine thread once it is this call's turn; its result."""
        call = _Call(fn, cost, next(self._order))
        with self._changed:
            if self._closed:
                raise RuntimeError("the service is closed")
            self._waiting.append(call)
            self._changed.notify()
        return call.result.result()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def priority(self, call: _Call) -> tuple[float, ...]:
        cost = call.cost
        if not self.cache_aware or time.perf_counter() - cost.arrival > self.starvation_s:
            return (0, cost.arrival, call.order)
        ratio = cost.reused_tokens / max(1, cost.compute_tokens)
        return (1, -ratio, cost.arrival, call.order)

    def close(self) -> None:
        """Run what is queued, then stop."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout=60)

    def _dispatch(self) -> None:
        while True:
            with self._changed:
                while not self._waiting and not self._closed:
                    self._changed.wait()
                if not self._waiting:
                    return
                call = min(self._waiting, key=self.priority)
                self._waiting.remove(call)
            try:
                call.result.set_result(self.engine.run_sync(call.fn))
            except BaseException as error:  # handed to the waiting caller
                call.result.set_exception(error)
