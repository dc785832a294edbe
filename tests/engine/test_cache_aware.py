"""Cache-aware ordering: reused KV (prefix cache and placed chunks) per token to compute,
a configurable waiting bound, and outputs that no ordering changes."""

from __future__ import annotations

import random

import pytest
import torch

from ragcache.engine.block_manager import BlockManager
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.scheduler import CacheAwarePolicy, make_policy
from ragcache.engine.sequence import PlacedKV, Sequence

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)
BLOCK = 8


def tokens(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(count)]


def placed(num_tokens: int, recompute: list[int], heads: int = 2, dim: int = 16) -> PlacedKV:
    k = [torch.zeros(num_tokens, heads, dim)]
    return PlacedKV(k, [t.clone() for t in k], recompute)


def cache_prefix(blocks: BlockManager, prompt: list[int], salt: str = "") -> None:
    """Leave ``prompt``'s full blocks in the prefix cache, as a finished request does."""
    seq = Sequence(prompt, SamplingParams(), cache_salt=salt)
    blocks.allocate(seq)
    blocks.register_full_blocks(seq, len(prompt))
    blocks.free(seq)


def test_reused_tokens_count_prefix_hits_and_placed_kv_once() -> None:
    blocks = BlockManager(64, BLOCK)
    shared = tokens(40, seed=1)
    cache_prefix(blocks, shared + tokens(8, seed=2))
    policy = CacheAwarePolicy(blocks)

    cold = Sequence(tokens(64, seed=3), GREEDY)
    prefix_hit = Sequence(shared + tokens(24, seed=4), GREEDY)
    # Placed KV for its first 56 tokens, 6 of them recomputed; the first 40 tokens are also
    # in the prefix cache, which is counted once and wins where both cover a token.
    both = Sequence(shared + tokens(24, seed=5), GREEDY, placed=placed(56, [2, 9, 41, 42, 50, 50]))
    other_tenant = Sequence(shared + tokens(24, seed=4), GREEDY, cache_salt="tenant-b")

    assert policy.reused_tokens(cold) == 0
    assert policy.reused_tokens(prefix_hit) == 40
    assert policy.reused_tokens(both) == 40 + (56 - 40) - 3
    assert policy.reused_tokens(other_tenant) == 0

    order = sorted([cold, prefix_hit, both], key=policy.priority)
    assert order == [both, prefix_hit, cold]


def test_prefix_hits_are_ignored_where_the_request_cannot_use_them() -> None:
    blocks = BlockManager(64, BLOCK)
    shared = tokens(40, seed=1)
    cache_prefix(blocks, shared + tokens(8, seed=2))
    policy = CacheAwarePolicy(blocks)
    opted_out = Sequence(shared + tokens(8, seed=6), GREEDY, use_prefix_cache=False)
    wants_prompt_logprobs = Sequence(
        shared + tokens(8, seed=6), SamplingParams(max_tokens=4, prompt_logprobs=1)
    )
    assert policy.reused_tokens(opted_out) == 0
    assert policy.reused_tokens(wants_prompt_logprobs) == 0
    assert CacheAwarePolicy(None).reused_tokens(Sequence([*shared, 7], GREEDY)) == 0


def test_a_request_past_the_waiting_bound_goes_first_oldest_first() -> None:
    blocks = BlockManager(64, BLOCK)
    shared = tokens(40, seed=1)
    cache_prefix(blocks, shared + tokens(8, seed=2))
    policy = make_policy("cache_aware", blocks, starvation_s=5.0)
    assert isinstance(policy, CacheAwarePolicy) and policy.starvation_s == 5.0

    old_cold = Sequence(tokens(64, seed=7), GREEDY)
    older_cold = Sequence(tokens(64, seed=8), GREEDY)
    warm = Sequence(shared + tokens(8, seed=9), GREEDY)
    assert sorted([old_cold, older_cold, warm], key=policy.priority)[0] is warm

    old_cold.arrival_time -= 6.0
    older_cold.arrival_time -= 9.0
    assert sorted([warm, old_cold, older_cold], key=policy.priority) == [
        older_cold,
        old_cold,
        warm,
    ]
    # A bound of zero seconds leaves arrival order: the policy degrades to FCFS.
    fcfs_like = make_policy("cache_aware", blocks, starvation_s=0.0)
    fresh_cold = Sequence(tokens(64, seed=10), GREEDY)
    fresh_warm = Sequence(shared + tokens(8, seed=11), GREEDY)
    fresh_cold.arrival_time -= 1e-3
    fresh_warm.arrival_time -= 1e-3
    assert sorted([fresh_warm, fresh_cold], key=fcfs_like.priority) == [fresh_cold, fresh_warm]


def test_negative_waiting_bound_is_refused(engine_model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="starvation_s=-1"):
        Engine(engine_model, EngineConfig(scheduling_policy="cache_aware", starvation_s=-1.0))


def make_engine(loaded: LoadedModel, policy: str, **overrides: object) -> Engine:
    settings: dict[str, object] = dict(
        kv_cache_bytes=8 << 20, block_size=BLOCK, max_num_batched_tokens=512
    )
    settings.update(overrides)
    return Engine(loaded, EngineConfig(scheduling_policy=policy, **settings))  # type: ignore[arg-type]


def test_engine_admits_a_prefix_cache_hit_before_an_older_cold_prompt(
    engine_model: LoadedModel,
) -> None:
    shared = tokens(96, seed=12)
    engine = make_engine(engine_model, "cache_aware", max_num_seqs=1)
    engine.generate([shared + tokens(4, seed=13)], GREEDY)
    cold = engine.add_request(tokens(100, seed=14), GREEDY)
    warm = engine.add_request(shared + tokens(4, seed=15), GREEDY)
    engine.step()
    assert warm.num_cached_tokens == 96 and warm.num_planned_done > 0
    assert cold.num_planned_done == 0

    bounded = make_engine(engine_model, "cache_aware", max_num_seqs=1, starvation_s=0.5)
    bounded.generate([shared + tokens(4, seed=13)], GREEDY)
    starving = bounded.add_request(tokens(100, seed=14), GREEDY)
    starving.arrival_time -= 1.0
    later_warm = bounded.add_request(shared + tokens(4, seed=15), GREEDY)
    bounded.step()
    assert starving.num_planned_done > 0 and later_warm.num_planned_done == 0


def test_greedy_outputs_are_the_same_under_every_policy(engine_model: LoadedModel) -> None:
    """A mixed queue (prefix hits, placed KV, cold prompts) decodes the same tokens
    whichever policy orders it; only the order of work changes."""
    spec = engine_model.spec
    shared = tokens(64, seed=16)
    prompts = [shared + tokens(12 + i, seed=20 + i) for i in range(3)]
    prompts += [tokens(50 + 7 * i, seed=30 + i) for i in range(3)]
    kv = [
        torch.randn(
            40, spec.num_kv_heads, spec.head_dim, generator=torch.Generator().manual_seed(i)
        )
        for i in range(spec.num_layers)
    ]
    placements = [None] * 5 + [PlacedKV(kv, [t * 0.5 for t in kv], recompute=[3, 17, 30])]

    def run(policy: str) -> tuple[list[list[int]], Engine]:
        engine = make_engine(engine_model, policy, max_num_seqs=2, max_num_batched_tokens=48)
        engine.generate([[*shared, 5]], GREEDY)
        seqs = [
            engine.add_request(p, GREEDY, placed=where)
            for p, where in zip(prompts, placements, strict=True)
        ]
        while engine.has_unfinished():
            engine.step()
        return [s.output_ids for s in seqs], engine

    fcfs, _ = run("fcfs")
    cache_aware, engine = run("cache_aware")
    assert cache_aware == fcfs
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
