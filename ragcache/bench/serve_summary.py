"""Aggregates of the serving benchmark: per phase (one rate, one cache mode) and per rate.

A phase *sustains* its rate when no request failed, answers completed at no less than
``SUSTAIN_FRACTION`` of the rate requests arrived at, and the queue did not grow: the
median TTFT of the later half of the requests is at most ``QUEUE_GROWTH_LIMIT`` times
that of the earlier half.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ragcache.bench.serve_client import RequestSample

SUSTAIN_FRACTION = 0.9
QUEUE_GROWTH_LIMIT = 2.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation; None without values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} must be in [0, 100]")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rate_over(times: Sequence[float]) -> float | None:
    """Events per second over the span of ``times`` (intervals / span); None if undefined."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


@dataclass(slots=True)
class PhaseSummary:
    mode: str
    rate: float
    sent: int
    completed: int
    errors: int
    wall_s: float
    offered_rate: float | None  # requests per second, over the span of send times
    completed_rate: float | None  # answers per second, over the span of finish times
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    e2e_p50_s: float | None
    server_ttft_p50_s: float | None
    chunk_share_by_tier: dict[str, float]  # retrieved chunks served by each tier, or computed
    recompute_fraction: float | None  # context tokens recomputed / context tokens
    queue_growth: float | None  # later-half median TTFT / earlier-half median TTFT
    sustained: bool
    error_messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _queue_growth(samples: Sequence[RequestSample]) -> float | None:
    ttfts = [s.ttft for s in sorted(samples, key=lambda s: s.sent) if s.ttft is not None]
    if len(ttfts) < 4:
        return None
    half = len(ttfts) // 2
    return ratio(percentile(ttfts[half:], 50), percentile(ttfts[:half], 50))


def summarize_phase(
    mode: str, rate: float, samples: Sequence[RequestSample], wall_s: float
) -> PhaseSummary:
    done = [s for s in samples if s.ok]
    failed = [s for s in samples if not s.ok]
    ttfts = [s.ttft for s in done if s.ttft is not None]
    tpots = [s.tpot for s in done if s.tpot is not None]
    e2es = [s.e2e for s in done if s.e2e is not None]
    server_ttfts = [s.server_ttft for s in done if s.server_ttft is not None]
    tiers = Counter(tier for s in done for tier in s.chunk_tiers)
    chunks = sum(tiers.values())
    context = sum(s.context_tokens for s in done)
    offered = rate_over([s.sent for s in samples])
    completed = rate_over([s.finished for s in done if s.finished is not None])
    growth = _queue_growth(done)
    keeps_up = offered is None or (
        completed is not None and completed >= SUSTAIN_FRACTION * offered
    )
    sustained = not failed and keeps_up and (growth is None or growth <= QUEUE_GROWTH_LIMIT)
    return PhaseSummary(
        mode=mode,
        rate=rate,
        sent=len(samples),
        completed=len(done),
        errors=len(failed),
        wall_s=wall_s,
        offered_rate=offered,
        completed_rate=completed,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        tpot_p50_s=percentile(tpots, 50),
        e2e_p50_s=percentile(e2es, 50),
        server_ttft_p50_s=percentile(server_ttfts, 50),
        chunk_share_by_tier={tier: n / chunks for tier, n in sorted(tiers.items())},
        recompute_fraction=ratio(sum(s.recomputed_tokens for s in done), context),
        queue_growth=growth,
        sustained=sustained,
        error_messages=sorted({s.error for s in failed if s.error})[:5],
    )


@dataclass(slots=True)
class RateComparison:
    rate: float
    on: PhaseSummary
    off: PhaseSummary

    @property
    def ttft_p50_ratio(self) -> float | None:
        """How many times lower p50 TTFT is with chunk caching on."""
        return ratio(self.off.ttft_p50_s, self.on.ttft_p50_s)

    @property
    def ttft_p99_ratio(self) -> float | None:
        return ratio(self.off.ttft_p99_s, self.on.ttft_p99_s)

    @property
    def e2e_p50_ratio(self) -> float | None:
        return ratio(self.off.e2e_p50_s, self.on.e2e_p50_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "on": self.on.to_dict(),
            "off": self.off.to_dict(),
            "ttft_p50_ratio": self.ttft_p50_ratio,
            "ttft_p99_ratio": self.ttft_p99_ratio,
            "e2e_p50_ratio": self.e2e_p50_ratio,
        }


@dataclass(slots=True)
class Verdict:
    """The comparison at the highest rate that caching off sustains."""

    target_ratio: float
    rate: float | None
    ttft_p50_ratio: float | None
    on_errors: int | None
    meets_target: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(comparisons: Sequence[RateComparison], target_ratio: float) -> Verdict:
    sustained = [c for c in comparisons if c.off.sustained]
    if not sustained:
        return Verdict(target_ratio, None, None, None, False)
    best = max(sustained, key=lambda c: c.rate)
    measured = best.ttft_p50_ratio
    meets = measured is not None and measured >= target_ratio and best.on.errors == 0
    return Verdict(target_ratio, best.rate, measured, best.on.errors, meets)
