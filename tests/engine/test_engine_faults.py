"""A fault of one request inside a step fails that request alone: the requests batched
with it finish with the tokens they have without it, and the engine keeps serving.

Each case breaks one admitted request the way a gap in validation or a bug would (a
value the sampler cannot hold, a token the model cannot embed, placed KV of the wrong
shape); nothing in the engine is replaced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.config import EngineConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.outputs import RequestFailedError, RequestOutput
from ragcache.engine.sampling_params import SamplingParams
from ragcache.engine.sequence import PlacedKV, Sequence

PROMPTS = [list(range(10, 30)), list(range(40, 52)), list(range(60, 75))]
BAD_PROMPT = list(range(80, 96))


def good_params() -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=6, ignore_eos=True),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=11),
        SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, top_k=20, seed=5),
    ]


def make_engine(loaded: LoadedModel) -> Engine:
    # One thread: tiny matrices gain nothing from more, and a busy CPU makes them slower.
    config = EngineConfig(kv_cache_bytes=4 << 20, block_size=8, max_num_seqs=8, threads=1)
    return Engine(loaded, config)


@pytest.fixture(scope="module")
def expected(engine_model: LoadedModel) -> list[list[int]]:
    outputs = make_engine(engine_model).generate(PROMPTS, good_params())
    return [output.token_ids for output in outputs]


def placed_kv(engine: Engine, num_tokens: int) -> PlacedKV:
    spec = engine.spec
    shape = (num_tokens, spec.num_kv_heads, spec.head_dim)
    k = [torch.zeros(shape) for _ in range(spec.num_layers)]
    return PlacedKV(k, [t.clone() for t in k])


def break_seed(engine: Engine, seq: Sequence) -> None:
    seq.params.temperature = 1.0
    seq.params.seed = 2**64


def break_top_k(engine: Engine, seq: Sequence) -> None:
    seq.params.temperature = 1.0
    seq.params.top_k = 2**63


def break_logprobs(engine: Engine, seq: Sequence) -> None:
    seq.params.logprobs = engine.spec.vocab_size + 1


def break_prompt_token(engine: Engine, seq: Sequence) -> None:
    seq.token_ids[3] = engine.spec.vocab_size + 7


def break_placed_kv(engine: Engine, seq: Sequence) -> None:
    assert seq.placed is not None
    seq.placed.k[1] = torch.zeros(seq.placed.num_tokens, 1, 1)


FAULTS: dict[str, Callable[[Engine, Sequence], None]] = {
    "seed the generator cannot hold": break_seed,
    "top_k past int64": break_top_k,
    "more logprobs than the vocabulary": break_logprobs,
    "token the model cannot embed": break_prompt_token,
    "placed KV of the wrong shape": break_placed_kv,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_one_failing_request_leaves_its_batch_untouched(
    engine_model: LoadedModel, expected: list[list[int]], fault: str
) -> None:
    engine = make_engine(engine_model)
    params = good_params()
    good = [engine.add_request(PROMPTS[0], params[0])]
    placed = placed_kv(engine, 8) if fault == "placed KV of the wrong shape" else None
    bad = engine.add_request(BAD_PROMPT, SamplingParams(max_tokens=6), placed=placed)
    good += [engine.add_request(p, sp) for p, sp in zip(PROMPTS[1:], params[1:], strict=True)]
    FAULTS[fault](engine, bad)
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    failed = finished[bad.request_id]
    assert failed.finish_reason == "error"
    assert failed.failure is not None and failed.error
    assert [finished[seq.request_id].token_ids for seq in good] == expected
    assert all(finished[seq.request_id].finish_reason == "length" for seq in good)
    assert not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    again = engine.generate(PROMPTS, good_params())
    assert [output.token_ids for output in again] == expected


def test_a_request_failing_while_its_drafts_are_verified_fails_alone(
    engine_model: LoadedModel,
) -> None:
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in make_engine(engine_model).generate(PROMPTS, greedy)]
    speculative = SpeculativeConfig(
        method="early_exit", num_speculative_tokens=3, draft_layers=2, adaptive=False
    )
    config = EngineConfig(kv_cache_bytes=4 << 20, block_size=8, threads=1, speculative=speculative)
    engine = Engine(engine_model, config)
    good = [engine.add_request(prompt, greedy) for prompt in PROMPTS]
    bad = engine.add_request(BAD_PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    finished: dict[str, RequestOutput] = {}
    for _ in range(2):
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    drafted = engine.stats()["spec_num_drafts"]
    break_logprobs(engine, bad)
    while engine.has_unfinished():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.stats()["spec_num_drafts"] > drafted
    assert finished[bad.request_id].finish_reason == "error"
    assert [finished[seq.request_id].token_ids for seq in good] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_stream_of_a_failing_request_raises_while_others_finish(
    engine_model: LoadedModel,
) -> None:
    long_params = [SamplingParams(max_tokens=24, ignore_eos=True) for _ in PROMPTS]
    alone = make_engine(engine_model).generate(PROMPTS, long_params)
    async_engine = AsyncEngine(make_engine(engine_model))

    async def tokens(prompt: list[int], params: SamplingParams) -> list[int]:
        out: list[int] = []
        async for output in async_engine.stream(prompt, params):
            out = output.token_ids
        return out

    async def failing() -> list[int]:
        params = SamplingParams(max_tokens=400, ignore_eos=True, temperature=1.0)
        async for output in async_engine.stream(BAD_PROMPT, params):
            if output.token_ids:
                # The engine holds this very object: its next sampling step raises.
                params.top_k = 2**63
        return []

    async def main() -> list[list[int] | BaseException]:
        good = [tokens(p, sp) for p, sp in zip(PROMPTS, long_params, strict=True)]
        return list(await asyncio.gather(failing(), *good, return_exceptions=True))

    try:
        results = asyncio.run(main())
        error = results.pop(0)
        assert isinstance(error, RequestFailedError)
        assert "Overflow" in str(error) and "Overflow" in str(error.__cause__)
        assert results == [output.token_ids for output in alone]
        free, total = async_engine.run_sync(
            lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks)
        )
        assert free == total
    finally:
        async_engine.shutdown()
