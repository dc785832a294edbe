"""The serving benchmark's records: one request of the workload and its measured timing."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(slots=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


@dataclass(slots=True)
class RequestTiming:
    """When a request started and when each of its output tokens became available."""

    prompt_len: int
    start: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for one-token outputs."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between the steps that returned tokens, as a stream would deliver them:
        tokens kept together from one speculative step arrive as one chunk (vLLM's
        benchmark_serving counts one inter-token latency per streamed chunk)."""
        arrivals = sorted(set(self.token_times))
        return [b - a for a, b in itertools.pairwise(arrivals)]
