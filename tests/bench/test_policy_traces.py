import numpy as np
import pytest

from ragcache.bench.policy import simulate
from ragcache.bench.policy_traces import (
    SMOLLM2_KV_BYTES_PER_TOKEN,
    Trace,
    TraceShape,
    best_set,
    make_shift_trace,
    make_trace,
    popularity_oracle,
    static_best,
)
from ragcache.chunkstore.policy import CostModel

PER_TOKEN = CostModel(per_token=1e-3, per_token_pair=0.0, fixed=0.0)


def test_trace_requests_follow_the_popularity_it_keeps():
    trace = make_trace(TraceShape(50, 20000), seed=3)
    ((start, probability),) = trace.phases
    assert start == 0 and probability.sum() == pytest.approx(1.0)
    counts = np.bincount(trace.requests, minlength=50) / 20000
    top = int(np.argmax(probability))
    assert counts[top] == pytest.approx(probability[top], abs=0.02)
    assert int(np.argmax(counts)) == top


def test_shift_trace_draws_a_new_ranking_halfway():
    trace = make_shift_trace(TraceShape(200, 1000), seed=0)
    (first_start, first), (second_start, second) = trace.phases
    assert (first_start, second_start) == (0, 500)
    assert int(np.argmax(first)) != int(np.argmax(second))
    assert len(trace.requests) == 1000


def test_best_set_fills_by_value_per_byte_and_skips_what_does_not_fit():
    value = np.array([10.0, 9.0, 1.0, 5.0])
    sizes = np.array([10, 6, 1, 5])
    eligible = np.array([True, True, True, False])
    # Value per byte: 1.5 (1), 1.0 (0, 2); chunk 3 is not eligible.
    assert best_set(value, sizes, 8, eligible).tolist() == [False, True, True, False]


def _two_chunk_trace(requests: list[int], probability: list[float]) -> Trace:
    return Trace(np.array([100, 100]), np.array(requests), [(0, np.array(probability))])


def test_oracle_holds_the_popular_chunk_and_misses_it_once():
    trace = _two_chunk_trace([1, 0, 0, 1, 0, 0], [0.7, 0.3])
    one_chunk = 100 * SMOLLM2_KV_BYTES_PER_TOKEN
    # Chunk 0 is cached from its first request: 3 of 6 equal-cost requests are hits.
    assert popularity_oracle(trace, one_chunk, PER_TOKEN) == pytest.approx(3 / 6)


def test_oracle_keeps_across_a_phase_only_what_both_best_sets_share():
    lengths = np.array([100, 100, 100])
    requests = np.array([0, 1, 0, 1, 1, 2, 1, 2])
    phases = [(0, np.array([0.5, 0.5, 0.0])), (4, np.array([0.0, 0.5, 0.5]))]
    trace = Trace(lengths, requests, phases)
    two_chunks = 200 * SMOLLM2_KV_BYTES_PER_TOKEN
    # Phase 1 hits 0 and 1 once each; phase 2 keeps 1 (two hits), computes 2 once (one hit).
    assert popularity_oracle(trace, two_chunks, PER_TOKEN) == pytest.approx(5 / 8)


def test_no_policy_passes_the_hindsight_set_and_the_oracle_is_close_to_it():
    trace = make_trace(TraceShape(300, 6000), seed=1)
    capacity = int(trace.lengths.sum() * SMOLLM2_KV_BYTES_PER_TOKEN * 0.2)
    hindsight = static_best(trace, capacity, PER_TOKEN)
    oracle = popularity_oracle(trace, capacity, PER_TOKEN)
    for policy in ("lru", "lfu", "pgdsf"):
        saved = simulate(policy, trace, capacity, PER_TOKEN)["saved_prefill_fraction"]
        assert saved <= hindsight
    assert abs(hindsight - oracle) < 0.05
