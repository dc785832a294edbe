"""The model benchmark's decode loop produces the tokens of a plain greedy decode."""

from __future__ import annotations

import torch

from ragcache.engine import bench_model
from tests.engine.conftest import TinyModel, greedy_paged
from tests.engine.test_model_parity import random_prompt, reference_greedy


def test_benchmark_greedy_loop_matches_greedy_decode_and_generate(tiny_llama: TinyModel) -> None:
    model, prompt, new_tokens = tiny_llama.ours, random_prompt(40, seed=6), 30
    pool = bench_model.pool_for(model, len(prompt) + new_tokens)
    with torch.inference_mode():
        timed_loop = bench_model.ours_greedy(model, pool, torch.tensor(prompt), new_tokens)
    blocks = list(range(pool.num_blocks))
    assert timed_loop == greedy_paged(model, prompt, new_tokens, blocks, bench_model.BLOCK_SIZE)
    assert timed_loop == reference_greedy(tiny_llama.reference, prompt, new_tokens)
