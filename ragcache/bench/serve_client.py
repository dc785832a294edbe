"""Open-loop load client: streamed ``POST /v1/query`` requests sent at scheduled times.

Each request is its own task, sent at its arrival time whether or not earlier ones have
finished (an open loop, as users arrive). Times are taken on the client: TTFT runs from
sending the request to the first answer-text event of its SSE stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ragcache.bench.serve_workload import Workload

COMPUTED = "computed"  # tier label of a chunk whose KV was computed for the request


@dataclass(slots=True)
class RequestSample:
    """One request of a phase; times in seconds from the phase start."""

    index: int
    question_id: int
    scheduled: float
    sent: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    context_tokens: int = 0
    recomputed_tokens: int = 0
    chunk_tiers: list[str] = field(default_factory=list)
    server_ttft: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None

    @property
    def ttft(self) -> float | None:
        first = self.first_token if self.first_token is not None else self.finished
        return None if first is None or not self.ok else first - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, over the streamed span."""
        if not self.ok or self.first_token is None or self.last_token is None:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.completion_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if not self.ok or self.finished is None else self.finished - self.sent

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "question_id": self.question_id,
            "scheduled_s": self.scheduled,
            "sent_s": self.sent,
            "ttft_s": self.ttft,
            "tpot_s": self.tpot,
            "e2e_s": self.e2e,
            "server_ttft_s": self.server_ttft,
            "completion_tokens": self.completion_tokens,
            "context_tokens": self.context_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "chunk_tiers": self.chunk_tiers,
            "error": self.error,
        }


def _read_result(sample: RequestSample, result: dict[str, Any]) -> None:
    cache = result["cache"]
    sample.completion_tokens = int(result["completion_tokens"])
    sample.context_tokens = int(cache["reused_tokens"]) + int(cache["recomputed_tokens"])
    sample.recomputed_tokens = int(cache["recomputed_tokens"])
    sample.chunk_tiers = [source.get("cache_tier") or COMPUTED for source in result["sources"]]
    sample.server_ttft = result.get("timings", {}).get("ttft")


async def _stream_one(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    sample: RequestSample,
    clock: Callable[[], float],
) -> None:
    sample.sent = clock()
    async with client.stream("POST", "/v1/query", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:200]
            sample.error = f"HTTP {response.status_code}: {message}"
            return
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[len("event:") :].strip()
                continue
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            now = clock()
            if event == "token":
                if sample.first_token is None:
                    sample.first_token = now
                sample.last_token = now
            elif event == "result":
                _read_result(sample, json.loads(data))
                sample.finished = now
            elif event == "error":
                sample.error = f"stream error: {json.loads(data).get('message', data)}"
                return
    if sample.finished is None and sample.error is None:
        sample.error = "the stream ended without a result event"


async def _request(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    sample: RequestSample,
    clock: Callable[[], float],
    timeout_s: float,
) -> RequestSample:
    try:
        await asyncio.wait_for(_stream_one(client, body, sample, clock), timeout_s)
    except asyncio.TimeoutError:
        sample.error = f"no complete answer within {timeout_s:g} s"
    except httpx.HTTPError as error:
        sample.error = f"{type(error).__name__}: {error}"
    except (ValueError, KeyError, TypeError) as error:
        sample.error = f"malformed response: {type(error).__name__}: {error}"
    return sample


async def run_phase(
    base_url: str,
    workload: Workload,
    make_body: Callable[[str], dict[str, Any]],
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> tuple[list[RequestSample], float]:
    """Sends every request of ``workload`` at its arrival time and waits for all answers;
    returns the samples and the phase's wall time."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        tasks = []
        for index, (arrival, question_id, question) in enumerate(
            zip(workload.arrivals, workload.question_ids, workload.questions, strict=True)
        ):
            delay = arrival - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            sample = RequestSample(index, question_id, arrival)
            request = _request(client, make_body(question), sample, clock, timeout_s)
            tasks.append(asyncio.create_task(request))
        samples = list(await asyncio.gather(*tasks))
        return samples, clock()
