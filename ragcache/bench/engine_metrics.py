"""Aggregates of the serving benchmark: latency percentiles, throughput, answer agreement."""

from __future__ import annotations

from typing import Any

import numpy as np

from ragcache.bench.engine_records import BenchRequest, RequestTiming
from ragcache.engine.config import EngineConfig


def latency_summary(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"mean_ms": float("nan"), "median_ms": float("nan"), "p99_ms": float("nan")}
    values = np.asarray(seconds) * 1000.0
    return {
        "mean_ms": float(values.mean()),
        "median_ms": float(np.median(values)),
        "p99_ms": float(np.percentile(values, 99)),
    }


def serving_metrics(
    timings: list[RequestTiming], duration: float, concurrent: bool
) -> dict[str, Any]:
    """vLLM's serving numbers; sequential runs report each request's own service time."""
    prompt_tokens = sum(t.prompt_len for t in timings)
    output_tokens = sum(len(t.token_ids) for t in timings)
    return {
        "latency_clock": "from t=0 (all submitted together)"
        if concurrent
        else "from the start of each request's own generate call",
        "completed": len(timings),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(timings) / duration,
        "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "ttft": latency_summary([t.ttft for t in timings]),
        "tpot": latency_summary([t.tpot for t in timings if t.tpot is not None]),
        "itl": latency_summary([gap for t in timings for gap in t.itls]),
        "e2e": latency_summary([t.e2e for t in timings]),
    }


def extrapolated_duration(measured: list[RequestTiming], workload: list[BenchRequest]) -> float:
    """Sequential time for the whole workload at the measured per-token prefill and decode cost."""
    prefill_per_token = sum(t.ttft for t in measured) / sum(t.prompt_len for t in measured)
    decode_steps = sum(len(t.token_ids) - 1 for t in measured)
    decode_per_token = sum(t.e2e - t.ttft for t in measured) / max(decode_steps, 1)
    return sum(
        prefill_per_token * len(r.prompt_ids) + decode_per_token * (r.output_len - 1)
        for r in workload
    )


def greedy_agreement(ours: list[RequestTiming], theirs: list[RequestTiming]) -> dict[str, Any]:
    """How far the two greedy outputs agree (transformers' min_new_tokens masks EOS)."""
    common = [
        next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y),
            min(len(a.token_ids), len(b.token_ids)),
        )
        for a, b in zip(ours, theirs, strict=False)
    ]
    return {
        "compared_requests": len(theirs),
        "identical_requests": sum(
            a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=False)
        ),
        "mean_identical_leading_tokens": float(np.mean(common)) if common else 0.0,
    }


def speculation_summary(config: EngineConfig, stats: dict[str, float]) -> dict[str, Any]:
    spec = config.speculative
    return {
        "method": spec.method,
        "num_speculative_tokens": spec.num_speculative_tokens,
        "disable_by_batch_size": spec.disable_by_batch_size,
        "acceptance_rate": stats.get("spec_acceptance_rate", 0.0),
        "decode_tokens_per_step": stats.get("decode_tokens_per_step", 1.0),
    }
