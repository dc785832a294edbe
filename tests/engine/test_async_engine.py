"""Concurrent async streams equal the batch engine; cancelled streams free their blocks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from ragcache.engine.async_engine import AsyncEngine
from ragcache.engine.config import EngineConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import LoadedModel
from ragcache.engine.outputs import RequestOutput
from ragcache.engine.sampling_params import InvalidRequestError, SamplingParams

PROMPTS = [list(range(10, 40)), list(range(100, 112)), list(range(200, 257)), [7, 8, 9]]
PARAMS = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 5, 9, 16)]


def make_engine(loaded: LoadedModel) -> Engine:
    # One thread: tiny matrices gain nothing from more, and a busy CPU makes them slower.
    config = EngineConfig(kv_cache_bytes=4 << 20, block_size=8, max_num_seqs=8, threads=1)
    return Engine(loaded, config)


@pytest.fixture
def async_engine(engine_model: LoadedModel) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(make_engine(engine_model))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def expected(engine_model: LoadedModel) -> list[list[int]]:
    return [o.token_ids for o in make_engine(engine_model).generate(PROMPTS, PARAMS)]


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    """Tokens as streamed, checking that each output extends the one before it."""
    streamed: list[int] = []
    last: RequestOutput | None = None
    async for output in engine.stream(prompt, params):
        streamed.extend(output.new_token_ids)
        assert output.token_ids == streamed
        last = output
    assert last is not None and last.finished and last.finish_reason == "length"
    return streamed


async def free_and_total_blocks(engine: AsyncEngine) -> tuple[int, int]:
    def read(e: Engine) -> tuple[int, int]:
        return e.block_manager.num_free_blocks, e.block_manager.num_blocks

    return await asyncio.to_thread(engine.run_sync, read)


def test_concurrent_streams_equal_batch_generate(
    async_engine: AsyncEngine, expected: list[list[int]]
) -> None:
    async def main() -> list[list[int]]:
        return list(
            await asyncio.gather(
                *(collect(async_engine, p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True))
            )
        )

    assert asyncio.run(main()) == expected
    assert async_engine.run_sync(lambda e: e.stats()["num_running"]) == 0


def test_leaving_a_stream_early_frees_its_blocks_at_once(async_engine: AsyncEngine) -> None:
    long_params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main() -> None:
        stream = async_engine.stream(list(range(30, 90)), long_params, request_id="leaver")
        async with contextlib.aclosing(stream) as outputs:
            async for output in outputs:
                if len(output.token_ids) == 3:
                    break
        free, total = await free_and_total_blocks(async_engine)
        assert free == total
        requests = await asyncio.to_thread(async_engine.run_sync, lambda e: dict(e.requests))
        assert "leaver" not in requests

    asyncio.run(main())


def test_cancelled_stream_frees_its_blocks_while_others_finish(
    async_engine: AsyncEngine, expected: list[list[int]]
) -> None:
    long_params = SamplingParams(max_tokens=400, ignore_eos=True)

    async def main() -> list[list[int]]:
        started = asyncio.Event()

        async def consume_forever() -> None:
            async for _ in async_engine.stream(list(range(300, 380)), long_params):
                started.set()

        doomed = asyncio.create_task(consume_forever())
        others = asyncio.gather(
            *(collect(async_engine, p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True))
        )
        await started.wait()
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        results = list(await others)
        free, total = await free_and_total_blocks(async_engine)
        assert free == total
        return results

    assert asyncio.run(main()) == expected
    generated = async_engine.run_sync(lambda e: e.num_generated_tokens)
    assert generated < sum(p.max_tokens for p in PARAMS) + long_params.max_tokens


def test_invalid_request_raises_from_its_stream_while_others_finish(
    async_engine: AsyncEngine, expected: list[list[int]]
) -> None:
    async def main() -> list[list[int] | BaseException]:
        bad = collect(async_engine, [1, 2, 3], SamplingParams(top_p=0.0))
        good = [collect(async_engine, p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)]
        return list(await asyncio.gather(good[0], bad, *good[1:], return_exceptions=True))

    results = asyncio.run(main())
    error = results.pop(1)
    assert isinstance(error, InvalidRequestError)
    assert "top_p" in str(error)
    assert results == expected
    free, total = async_engine.run_sync(
        lambda e: (e.block_manager.num_free_blocks, e.block_manager.num_blocks)
    )
    assert free == total


def test_generate_returns_the_final_output(
    async_engine: AsyncEngine, expected: list[list[int]]
) -> None:
    output = asyncio.run(async_engine.generate(PROMPTS[0], PARAMS[0]))
    assert output.finished
    assert output.token_ids == expected[0]
