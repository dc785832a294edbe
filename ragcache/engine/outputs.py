"""What the engine hands back for a request: tokens, text, reasons and timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ragcache.engine.sequence import TokenLogprob


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: dict[int, float] = field(default_factory=dict)
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    error: str | None = None
    # The exception that stopped this request inside the engine (finish_reason "error");
    # None when the engine refused the request on purpose (its error says why).
    failure: Exception | None = None


class RequestFailedError(RuntimeError):
    """A request the engine stopped because its part of a step raised; the other requests
    went on. ``__cause__`` holds the original exception."""
