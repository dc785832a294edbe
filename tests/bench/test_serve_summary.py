"""Aggregation of the serving benchmark on hand-made request samples."""

from __future__ import annotations

import pytest

from ragcache.bench.serve_client import COMPUTED, RequestSample
from ragcache.bench.serve_summary import (
    RateComparison,
    percentile,
    rate_over,
    summarize_phase,
    verdict,
)


def sample(
    index: int,
    sent: float,
    ttft: float,
    e2e: float,
    tokens: int = 5,
    tiers: tuple[str, ...] = ("host", "host", COMPUTED),
    recomputed: int = 30,
    error: str | None = None,
) -> RequestSample:
    done = RequestSample(index, 0, sent, sent=sent, error=error)
    if error is None:
        done.first_token = sent + ttft
        done.last_token = sent + e2e - 0.01
        done.finished = sent + e2e
        done.completion_tokens = tokens
        done.context_tokens = 300
        done.recomputed_tokens = recomputed
        done.chunk_tiers = list(tiers)
    return done


def test_percentile_interpolates_linearly() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_rate_over_counts_intervals_per_second() -> None:
    assert rate_over([0.0, 1.0, 2.0, 4.0]) == pytest.approx(0.75)
    assert rate_over([5.0]) is None and rate_over([2.0, 2.0]) is None


def test_phase_summary_of_a_steady_phase() -> None:
    samples = [sample(i, sent=2.0 * i, ttft=0.5 + 0.1 * i, e2e=1.0 + 0.1 * i) for i in range(4)]
    summary = summarize_phase("on", 0.5, samples, wall_s=7.5)
    assert (summary.sent, summary.completed, summary.errors) == (4, 4, 0)
    assert summary.ttft_p50_s == pytest.approx(0.65)
    assert summary.ttft_p99_s == pytest.approx(0.797)
    assert summary.e2e_p50_s == pytest.approx(1.15)
    assert summary.tpot_p50_s == pytest.approx((1.15 - 0.01 - 0.65) / 4)
    assert summary.offered_rate == pytest.approx(0.5)
    assert summary.completed_rate == pytest.approx(3 / 6.3)
    assert summary.chunk_share_by_tier == pytest.approx({COMPUTED: 1 / 3, "host": 2 / 3})
    assert summary.recompute_fraction == pytest.approx(0.1)
    assert summary.queue_growth == pytest.approx(0.75 / 0.55)
    assert summary.sustained


def test_a_growing_queue_or_an_error_is_not_sustained() -> None:
    growing = [sample(i, sent=1.0 * i, ttft=1.0 + 3 * i, e2e=2.0 + 3 * i) for i in range(6)]
    summary = summarize_phase("off", 1.0, growing, wall_s=20)
    assert summary.completed_rate is not None and summary.completed_rate < 0.9
    assert summary.queue_growth is not None and summary.queue_growth > 2 and not summary.sustained
    failed = [sample(0, 0, 0.5, 1.0), sample(1, 1.0, 0, 0, error="HTTP 500: boom")]
    summary = summarize_phase("on", 1.0, failed, wall_s=2)
    assert (summary.completed, summary.errors) == (1, 1) and not summary.sustained
    assert summary.error_messages == ["HTTP 500: boom"]


def test_ratios_and_verdict_use_the_highest_rate_off_sustains() -> None:
    def phases(rate: float, on_ttft: float, off_ttft: float, off_growth: float):
        on = [sample(i, 2.0 * i, on_ttft, on_ttft + 1) for i in range(4)]
        off = [sample(i, 2.0 * i, off_ttft * off_growth**i, off_ttft + 1) for i in range(4)]
        return RateComparison(
            rate, summarize_phase("on", rate, on, 8), summarize_phase("off", rate, off, 8)
        )

    low = phases(0.1, on_ttft=0.5, off_ttft=2.0, off_growth=1.0)
    mid = phases(0.2, on_ttft=0.5, off_ttft=1.6, off_growth=1.0)
    high = phases(0.3, on_ttft=0.5, off_ttft=1.0, off_growth=3.0)
    assert low.ttft_p50_ratio == pytest.approx(4.0)
    assert not high.off.sustained
    result = verdict([low, mid, high], target_ratio=3.0)
    assert result.rate == 0.2 and result.ttft_p50_ratio == pytest.approx(3.2)
    assert result.meets_target and result.on_errors == 0
    assert not verdict([low, mid], target_ratio=5.0).meets_target
    assert verdict([high], target_ratio=3.0).rate is None
