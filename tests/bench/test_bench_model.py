"""The model benchmark's decode loop produces the tokens of a plain greedy decode."""

from __future__ import annotations

import torch

from ragcache.bench import model as bench_model
from ragcache.bench import model_passes
from tests.engine.conftest import TinyModel, greedy_paged
from tests.engine.test_model_parity import random_prompt, reference_greedy


def test_benchmark_greedy_loop_matches_greedy_decode_and_generate(tiny_llama: TinyModel) -> None:
    model, prompt, new_tokens = tiny_llama.ours, random_prompt(40, seed=6), 30
    pool = model_passes.pool_for(model, len(prompt) + new_tokens)
    with torch.inference_mode():
        timed_loop = model_passes.ours_greedy(model, pool, torch.tensor(prompt), new_tokens)
    blocks = list(range(pool.num_blocks))
    assert timed_loop == greedy_paged(model, prompt, new_tokens, blocks, bench_model.BLOCK_SIZE)
    assert timed_loop == reference_greedy(tiny_llama.reference, prompt, new_tokens)


def test_timed_transformers_decode_returns_generate_tokens(tiny_llama: TinyModel) -> None:
    prompt, new_tokens = random_prompt(24, seed=7), 12
    tokens, seconds = model_passes.transformers_greedy_timed(
        tiny_llama.reference, torch.tensor(prompt), new_tokens
    )
    assert tokens == reference_greedy(tiny_llama.reference, prompt, new_tokens)
    assert seconds > 0


def test_row_ratio_is_the_median_of_paired_ratios() -> None:
    row = bench_model.Row("float32", "as loaded", "prefill", 100, [1.0, 2.0, 1.0], [2.0, 2.0, 3.0])
    assert row.pair_ratios == [2.0, 1.0, 3.0]
    assert row.ratio == 2.0
    assert row.ours_tokens_per_s == 100.0
    assert row.transformers_tokens_per_s == 50.0
