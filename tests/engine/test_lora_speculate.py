"""Speculative decoding under LoRA adapters: draft tokens are verified with their
sequence's adapter, so greedy output is the same with and without speculation."""

from __future__ import annotations

import pytest

from ragcache.engine.config import EngineConfig, SpeculativeConfig
from ragcache.engine.engine import Engine
from ragcache.engine.lora_config import LoraConfig
from ragcache.engine.sampling_params import SamplingParams
from tests.conftest import loaded_from_hf, random_hf_model
from tests.lora_helpers import PeftAdapter, make_peft_adapter

GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
# Repeating prompts, so prompt lookup always finds n-grams to draft from.
PROMPTS = [[5 + (i + j) % (4 + i) for j in range(40)] for i in range(4)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PeftAdapter]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_peft_adapter(root / "a", seed=11),
        "b": make_peft_adapter(root / "b", seed=12, targets=["q_proj", "v_proj"], r=4),
    }


def run(adapters: dict[str, PeftAdapter], method: str) -> tuple[list[list[int]], dict]:
    speculative = SpeculativeConfig(method=method, num_speculative_tokens=4, adaptive=False)
    engine = Engine(
        loaded_from_hf(random_hf_model()),
        EngineConfig(kv_cache_bytes=8 << 20, block_size=8, speculative=speculative),
        LoraConfig(adapters=[f"{name}={a.path}" for name, a in adapters.items()]),
    )
    names = ["a", None, "b", "a"]
    outputs = engine.generate(PROMPTS, GREEDY, adapter=names)
    return [out.token_ids for out in outputs], engine.stats()


def test_drafts_under_adapters_keep_greedy_output(adapters: dict[str, PeftAdapter]) -> None:
    plain, _ = run(adapters, "off")
    speculated, stats = run(adapters, "ngram")
    assert stats["spec_num_draft_tokens"] > 0  # drafts were verified under the adapters
    assert speculated == plain
