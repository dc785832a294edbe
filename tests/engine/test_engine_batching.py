"""Continuous batching, chunked prefill, preemption and prefix caching keep outputs exact."""

from __future__ import annotations

import random

import torch

from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import PlacedKV

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def make_engine(loaded: LoadedModel, **overrides) -> Engine:
    settings = dict(kv_cache_bytes=8 << 20, block_size=8, max_num_batched_tokens=512)
    settings.update(overrides)
    return Engine(loaded, EngineConfig(**settings))


def random_prompts(count: int, seed: int, low: int = 5, high: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(low, high))] for _ in range(count)]


def one_at_a_time(loaded: LoadedModel, prompts: list[list[int]]) -> list[list[int]]:
    engine = make_engine(loaded, enable_prefix_caching=False)
    return [engine.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_batched_chunked_prefill_matches_sequential(engine_model: LoadedModel) -> None:
    prompts = random_prompts(8, seed=1)
    expected = one_at_a_time(engine_model, prompts)
    engine = make_engine(engine_model, max_num_batched_tokens=40, max_num_seqs=5)
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_arriving_mid_run_match_sequential(engine_model: LoadedModel) -> None:
    prompts = random_prompts(6, seed=2)
    expected = one_at_a_time(engine_model, prompts)
    engine = make_engine(engine_model, max_num_batched_tokens=32)
    ids = [engine.add_request(p, GREEDY).request_id for p in prompts[:2]]
    pending = list(prompts[2:])
    done = {}
    while engine.has_unfinished() or pending:
        if pending and engine.num_steps % 3 == 0:
            ids.append(engine.add_request(pending.pop(0), GREEDY).request_id)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    assert [done[i] for i in ids] == expected


def test_forced_preemption_resumes_with_identical_output(engine_model: LoadedModel) -> None:
    prompts = random_prompts(6, seed=3, low=30, high=60)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = make_engine(engine_model, enable_prefix_caching=False)
    expected = [reference.generate([p], params)[0].token_ids for p in prompts]
    per_block = engine_model.spec.kv_bytes_per_token * 8 * 4
    engine = make_engine(engine_model, kv_cache_bytes=per_block * 24)
    outputs = engine.generate(prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected


def test_prefix_cache_reuses_shared_leading_blocks(engine_model: LoadedModel) -> None:
    engine = make_engine(engine_model)
    system = list(range(10, 50))
    first = engine.generate([[*system, 60, 61, 62]], GREEDY)[0]
    second = engine.generate([[*system, 70, 71]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40
    fresh = make_engine(engine_model, enable_prefix_caching=False)
    assert second.token_ids == fresh.generate([[*system, 70, 71]], GREEDY)[0].token_ids


def test_cache_salt_separates_prefix_caches(engine_model: LoadedModel) -> None:
    engine = make_engine(engine_model)
    prompt = list(range(10, 60))
    engine.add_request(prompt, GREEDY, cache_salt="tenant-a")
    while engine.has_unfinished():
        engine.step()
    other = engine.add_request(prompt, GREEDY, cache_salt="tenant-b")
    assert other.num_cached_tokens == 0
    while engine.has_unfinished():
        engine.step()
    assert other.num_cached_tokens == 0


def test_placed_exact_kv_gives_same_output(engine_model: LoadedModel) -> None:
    prompt = random_prompts(1, seed=4, low=40, high=40)[0]
    engine = make_engine(engine_model, enable_prefix_caching=False)
    expected = engine.generate([prompt], GREEDY)[0].token_ids
    spec = engine_model.spec
    k = [torch.zeros(32, spec.num_kv_heads, spec.head_dim) for _ in range(spec.num_layers)]
    v = [torch.zeros_like(t) for t in k]
    capture = make_engine(engine_model, enable_prefix_caching=False)
    seq = capture.add_request(prompt, SamplingParams(max_tokens=5, ignore_eos=True))
    capture.step()
    slots = torch.tensor([seq.slot(i, 8) for i in range(32)])
    for layer in range(spec.num_layers):
        k[layer], v[layer] = capture.pool.read_slots(layer, slots)
    placed = PlacedKV(k, v, recompute=[])
    fused = make_engine(engine_model, enable_prefix_caching=False)
    seq = fused.add_request(prompt, GREEDY, placed=placed)
    while fused.has_unfinished():
        fused.step()
    assert seq.output_ids == expected
    assert seq.plan[0] == 32


def test_thousand_requests_with_cancellations_leave_no_leak(engine_model: LoadedModel) -> None:
    rng = random.Random(7)
    engine = make_engine(engine_model, kv_cache_bytes=2 << 20, max_num_seqs=16)
    live: list[str] = []
    submitted = 0
    while submitted < 1000 or engine.has_unfinished():
        while submitted < 1000 and len(live) < 24:
            prompt = [rng.randrange(3, 512) for _ in range(rng.randint(1, 40))]
            params = SamplingParams(max_tokens=rng.randint(1, 6), ignore_eos=True)
            live.append(engine.add_request(prompt, params).request_id)
            submitted += 1
        if live and rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished and out.request_id in live:
                live.remove(out.request_id)
    manager = engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)
    assert manager.num_cached_free_blocks > 0
    assert not engine.requests


def test_swap_preemption_resumes_with_identical_output(engine_model: LoadedModel) -> None:
    prompts = random_prompts(6, seed=8, low=30, high=60)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    reference = make_engine(engine_model, enable_prefix_caching=False)
    expected = [reference.generate([p], params)[0].token_ids for p in prompts]
    per_block = engine_model.spec.kv_bytes_per_token * 8 * 4
    engine = make_engine(engine_model, kv_cache_bytes=per_block * 24, preemption_mode="swap")
    outputs = engine.generate(prompts, params)
    assert engine.num_swapped_out > 0
    assert [o.token_ids for o in outputs] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_cache_aware_policy_runs_mostly_cached_requests_first(engine_model: LoadedModel) -> None:
    spec = engine_model.spec
    cold = random_prompts(1, seed=9, low=80, high=80)[0]
    warm = random_prompts(1, seed=10, low=80, high=80)[0]
    k = [torch.zeros(70, spec.num_kv_heads, spec.head_dim) for _ in range(spec.num_layers)]
    placed = PlacedKV(k, [t.clone() for t in k], recompute=[])
    engine = make_engine(
        engine_model, scheduling_policy="cache_aware", max_num_seqs=1, enable_prefix_caching=False
    )
    first = engine.add_request(cold, GREEDY)
    second = engine.add_request(warm, GREEDY, placed=placed)
    engine.step()
    assert second.num_planned_done > 0 and first.num_planned_done == 0
    while engine.has_unfinished():
        engine.step()
    fcfs = make_engine(engine_model, enable_prefix_caching=False)
    assert first.output_ids == fcfs.generate([cold], GREEDY)[0].token_ids
