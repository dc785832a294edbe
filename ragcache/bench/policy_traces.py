"""Synthetic chunk-request traces for the policy benchmark, and two offline references.

A trace keeps the popularity it was drawn from, so the benchmark can ask what the best
cache could expect: on a trace with independent requests, the best an online policy can
expect is to hold, from the start of each phase, the set of chunks that maximises
probability x recompute cost within the capacity (the popularity oracle). The hindsight
set (``static_best``) instead knows the realised counts, so it also profits from the
draw's noise; it reads a little above the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ragcache.chunkstore.policy import CostModel

SMOLLM2_KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2


@dataclass(slots=True)
class Trace:
    """Chunk lengths in tokens, the requested chunk ids, and the popularity each phase
    drew from: ``phases[i] = (index of its first request, probability of each chunk)``."""

    lengths: np.ndarray
    requests: np.ndarray
    phases: list[tuple[int, np.ndarray]]


@dataclass(slots=True)
class TraceShape:
    """How many chunks and requests, the Zipf exponent and the range of chunk lengths."""

    num_chunks: int
    num_requests: int
    zipf_s: float = 1.1
    min_tokens: int = 64
    max_tokens: int = 2048


def make_trace(shape: TraceShape, seed: int) -> Trace:
    """Zipf popularity over chunks of log-uniform length; popularity is independent of
    length (rank r goes to a random chunk)."""
    rng = np.random.default_rng(seed)
    bounds = np.log(shape.min_tokens), np.log(shape.max_tokens)
    lengths = np.exp(rng.uniform(*bounds, shape.num_chunks))
    popularity = 1.0 / np.arange(1, shape.num_chunks + 1) ** shape.zipf_s
    popularity /= popularity.sum()
    chunk_of_rank = rng.permutation(shape.num_chunks)
    drawn = rng.choice(shape.num_chunks, size=shape.num_requests, p=popularity)
    probability = np.empty(shape.num_chunks)
    probability[chunk_of_rank] = popularity
    return Trace(lengths.astype(np.int64), chunk_of_rank[drawn], [(0, probability)])


def make_shift_trace(shape: TraceShape, seed: int) -> Trace:
    """Like ``make_trace``, but a new popularity ranking is drawn halfway through."""
    half = shape.num_requests // 2
    first = make_trace(replace(shape, num_requests=half), seed)
    second = make_trace(replace(shape, num_requests=shape.num_requests - half), seed + 1000)
    return Trace(
        first.lengths,
        np.concatenate([first.requests, second.requests]),
        [first.phases[0], (half, second.phases[0][1])],
    )


TRACES = {"zipf": make_trace, "shift": make_shift_trace}


def chunk_costs(lengths: np.ndarray, cost_model: CostModel) -> np.ndarray:
    return np.array([cost_model.seconds(int(n)) for n in lengths])


def best_set(
    value: np.ndarray, sizes: np.ndarray, capacity: int, eligible: np.ndarray
) -> np.ndarray:
    """Greedy knapsack by value per byte over the eligible chunks: a boolean mask."""
    chosen = np.zeros(len(value), dtype=bool)
    used = 0
    for chunk in np.argsort(-(value / sizes), kind="stable"):
        if not eligible[chunk]:
            continue
        if used + sizes[chunk] <= capacity:
            used += int(sizes[chunk])
            chosen[chunk] = True
    return chosen


def popularity_oracle(trace: Trace, capacity: int, cost_model: CostModel) -> float:
    """Saved prefill fraction of a cache that knows each phase's popularity and holds
    that phase's best set; a chunk enters only when requested (it must be computed once),
    and at a phase change keeps what the new best set shares with the old."""
    costs = chunk_costs(trace.lengths, cost_model)
    sizes = trace.lengths * SMOLLM2_KV_BYTES_PER_TOKEN
    starts = [start for start, _ in trace.phases] + [len(trace.requests)]
    cached = np.zeros(len(trace.lengths), dtype=bool)
    saved = 0.0
    for (start, probability), end in zip(trace.phases, starts[1:], strict=True):
        chosen = best_set(probability * costs, sizes, capacity, probability > 0)
        cached &= chosen
        for chunk in trace.requests[start:end].tolist():
            if cached[chunk]:
                saved += costs[chunk]
            elif chosen[chunk]:
                cached[chunk] = True
    return float(saved / costs[trace.requests].sum())


def static_best(trace: Trace, capacity: int, cost_model: CostModel) -> float:
    """Saved prefill fraction of the best fixed set chosen knowing the whole trace's
    counts, missed once on each first request. It profits from the draw's noise, so
    it is a hindsight reference, not a bound any policy could expect to reach."""
    costs = chunk_costs(trace.lengths, cost_model)
    sizes = trace.lengths * SMOLLM2_KV_BYTES_PER_TOKEN
    counts = np.bincount(trace.requests, minlength=len(trace.lengths))
    chosen = best_set(counts * costs, sizes, capacity, counts >= 2)
    saved = float(((counts - 1) * costs)[chosen].sum())
    return saved / float(costs[trace.requests].sum())
