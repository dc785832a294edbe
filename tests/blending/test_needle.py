"""A fact planted in one chunk is answered alike by every fusion method (real SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragcache.blending.prompt import PromptBuilder
from ragcache.blending.registry import METHOD_NAMES
from ragcache.engine.config import EngineConfig, ModelConfig
from ragcache.engine.engine import Engine
from ragcache.engine.loader import load_model
from ragcache.evaluation.fusion_eval import FusionEvaluator, Setting

NEEDLE = "The vault in the old library opens with the code 4721."
QUESTION = "Which code opens the vault in the old library?"


@pytest.fixture(scope="module")
def evaluator() -> FusionEvaluator:
    loaded = load_model(ModelConfig(dtype="float32"))
    engine = Engine(
        loaded,
        EngineConfig(
            kv_cache_bytes=256 << 20, max_num_batched_tokens=4096, enable_prefix_caching=False
        ),
    )
    return FusionEvaluator(engine, PromptBuilder(loaded.tokenizer), max_new_tokens=12)


@pytest.mark.slow
def test_needle_in_third_chunk_is_answered_alike(
    evaluator: FusionEvaluator, shared_data: Path
) -> None:
    item = json.loads((shared_data / "musique_dev.json").read_text())[3]
    ctxs = [dict(c) for c in item["ctxs"][:4]]
    for ctx in ctxs:
        ctx["text"] = " ".join(ctx["text"].split()[:60])
    ctxs[2]["text"] = f"{ctxs[2]['text']} {NEEDLE}"
    example = {"question": QUESTION, "answers": ["4721"], "ctxs": ctxs}
    settings = [Setting(name, name) for name in METHOD_NAMES]
    outcomes = evaluator.evaluate(0, example, settings, passages=4)
    reference = next(o for o in outcomes if o.setting == "full_prefill")
    assert "4721" in reference.answer
    for outcome in outcomes:
        assert "4721" in outcome.answer, (outcome.setting, outcome.answer)
