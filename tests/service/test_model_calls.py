"""The service's model calls wait for the engine thread in cache-aware order, with a
waiting bound; fcfs keeps arrival order; answers never depend on the order (a real
engine thread, faiss index and LMDB on a tiny model)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.sampling_params import SamplingParams
from ragcache.service import RagCache
from ragcache.service.model_calls import ModelCallQueue, QueryCost
from ragcache.service.results import QueryResult
from tests.service_helpers import SAMPLES, minilm, tiny_config, tiny_loaded


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncEngine(Engine(tiny_loaded(), EngineConfig(kv_cache_bytes=4 << 20)))
    yield engine
    engine.shutdown()


def run_queued(queue: ModelCallQueue, costs: dict[str, QueryCost]) -> list[str]:
    """Hold the engine thread with one call, queue one call per cost (in dict order),
    release: the order in which the queued calls then ran."""
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold(engine: Engine) -> None:
        started.set()
        release.wait(timeout=30)

    holder = threading.Thread(target=queue.run, args=(hold, QueryCost(0, 1)))
    holder.start()
    assert started.wait(timeout=30)
    callers = []
    for name, cost in costs.items():
        caller = threading.Thread(
            target=queue.run, args=(lambda engine, name=name: ran.append(name), cost)
        )
        caller.start()
        callers.append(caller)
        while queue.num_waiting < len(callers):  # queued in this order
            time.sleep(0.001)
    release.set()
    for thread in [holder, *callers]:
        thread.join(timeout=30)
    return ran


def test_cached_queries_go_before_cold_ones_that_came_earlier(async_engine: AsyncEngine) -> None:
    queue = ModelCallQueue(async_engine, cache_aware=True, starvation_s=60.0)
    now = time.perf_counter()
    costs = {
        "cold": QueryCost(reused_tokens=20, compute_tokens=600, arrival=now - 0.3),
        "half": QueryCost(reused_tokens=300, compute_tokens=320, arrival=now - 0.2),
        "warm": QueryCost(reused_tokens=620, compute_tokens=20, arrival=now - 0.1),
    }
    assert run_queued(queue, costs) == ["warm", "half", "cold"]
    queue.close()


def test_a_query_past_the_waiting_bound_goes_first(async_engine: AsyncEngine) -> None:
    queue = ModelCallQueue(async_engine, cache_aware=True, starvation_s=1.0)
    now = time.perf_counter()
    costs = {
        "warm": QueryCost(620, 20, arrival=now),
        "starving cold": QueryCost(20, 600, arrival=now - 2.0),
        "older starving cold": QueryCost(20, 600, arrival=now - 3.0),
    }
    assert run_queued(queue, costs) == ["older starving cold", "starving cold", "warm"]
    queue.close()


def test_fcfs_keeps_arrival_order(async_engine: AsyncEngine) -> None:
    queue = ModelCallQueue(async_engine, cache_aware=False, starvation_s=60.0)
    now = time.perf_counter()
    costs = {
        "cold": QueryCost(20, 600, arrival=now - 0.2),
        "warm": QueryCost(620, 20, arrival=now - 0.1),
    }
    assert run_queued(queue, costs) == ["cold", "warm"]
    queue.close()


def test_errors_reach_the_caller_and_close_refuses_new_calls(async_engine: AsyncEngine) -> None:
    queue = ModelCallQueue(async_engine, cache_aware=True, starvation_s=2.0)

    def fail(engine: Engine) -> None:
        raise ValueError("chunk has no tokens")

    with pytest.raises(ValueError, match="chunk has no tokens"):
        queue.run(fail, QueryCost(0, 1))
    assert queue.run(lambda engine: engine.block_manager.num_blocks, QueryCost(0, 1)) > 0
    queue.close()
    with pytest.raises(RuntimeError, match="closed"):
        queue.run(lambda engine: None, QueryCost(0, 1))
    with pytest.raises(ValueError, match="starvation_s=-1"):
        ModelCallQueue(async_engine, cache_aware=True, starvation_s=-1.0)


QUESTIONS = [
    "What did Lincoln say at Gettysburg about the nation?",
    "Which truths are held to be self-evident?",
    "Was it the best of times or the worst of times?",
    "Is a single man in possession of a good fortune in want of a wife?",
]


def test_a_burst_of_warm_and_cold_queries_answers_the_same_under_both_policies(
    tmp_path: Path,
) -> None:
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    answers: dict[str, list[str]] = {}
    for policy in ("fcfs", "cache_aware"):
        config = tiny_config(tmp_path / policy)
        config.service.kv_precompute = "lazy"
        config.engine.scheduling_policy = policy
        with RagCache(config=config, loaded=tiny_loaded(), embedder=minilm()) as rag:
            rag.create_corpus("docs")
            rag.ingest([SAMPLES], "docs")
            rag.query(QUESTIONS[0], "docs", sampling=greedy)  # its chunks are now cached

            async def burst(rag: RagCache = rag) -> list[QueryResult]:
                queries = [rag.aquery(q, "docs", sampling=greedy) for q in QUESTIONS * 2]
                return list(await asyncio.gather(*queries))

            results = asyncio.run(burst())
            answers[policy] = [result.answer for result in results]
            assert results[0].cache.computed_tokens == 0
            manager = rag.engine.block_manager
            assert manager.num_free_blocks == manager.num_blocks
            assert rag.model_calls.num_waiting == 0
    assert answers["cache_aware"] == answers["fcfs"]
